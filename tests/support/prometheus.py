"""A real Prometheus for tests: Debian's `prometheus` on a free loopback port.

Owns starting it with a config that scrapes its targets every second (optionally evaluating
rule files), waiting until it is ready, querying its HTTP API, and stopping it by pid.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.support.api import poll
from tests.support.servers import free_port, stop_process

Vector = list[dict[str, Any]]


class Prometheus:
    def __init__(
        self,
        workdir: Path,
        targets: int | dict[str, int],
        job: str = "nbdcsi",
        rule_files: Sequence[Path] = (),
    ) -> None:
        """Scrape `targets`: one port (as job `job`), or {job: port} for several."""
        if isinstance(targets, int):
            targets = {job: targets}
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML: no YAML library needed
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(f) for f in rule_files],
                    "scrape_configs": [
                        {
                            "job_name": name,
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                        }
                        for name, port in targets.items()
                    ],
                }
            )
        )
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return bytes(r.read())

    def api(self, path: str, **params: str) -> Any:
        body = json.loads(self.get(f"/api/v1/{path}?" + urllib.parse.urlencode(params)))
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            self.get("/-/ready")
            return True
        except OSError:
            return False

    def vector(self, promql: str) -> Vector:
        """An instant query's result: [{"metric": labels, "value": [t, v]}]."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", (promql, data)
        result: Vector = data["result"]
        return result

    def samples(self, promql: str) -> list[tuple[dict[str, str], float]]:
        return [(r["metric"], float(r["value"][1])) for r in self.vector(promql)]

    def value(self, promql: str) -> float | None:
        result = self.samples(promql)
        return result[0][1] if len(result) == 1 else None

    def wait(self, promql: str, done: Callable[[Vector], bool]) -> Vector:
        return poll(lambda: self.vector(promql), done, 45, f"query {promql}", step=0.5)

    def wait_value(self, promql: str, done: Callable[[float | None], bool]) -> float | None:
        return poll(lambda: self.value(promql), done, 45, f"query {promql}", step=0.5)

    def stop(self) -> None:
        stop_process(self.proc)
