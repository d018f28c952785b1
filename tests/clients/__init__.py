"""Interoperability tests: real NBD clients from Debian packages against our storage node.

Owns: the tests that drive qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and fio against a
running server on 127.0.0.1 and assert exact bytes and behaviour, plus the libnbd load script
used by `tests/test_durability.py`. `NBD_CLIENT_TESTS_SERVER=qemu-nbd` points the same tests
at qemu-nbd, which is how they were validated before our server existed.
"""
