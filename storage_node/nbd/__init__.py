"""NBD protocol: pure codec (constants, handshake, transmission) and the asyncio server."""
