"""Drive CNI plugins exactly as libcni does, for the conformance tests.

libcni (containernetworking/cni ``libcni/api.go``) runs a plugin found by its
``type`` in ``CNI_PATH`` with the runtime's environment plus ``CNI_COMMAND``,
``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` and
``CNI_PATH``, and the plugin's configuration on stdin, built from the
configuration list: ``name`` and ``cniVersion`` copied in, ``runtimeConfig``
holding the capabilities the plugin declares, ``prevResult`` the previous
plugin's result on ADD and the cached result of the whole ADD on CHECK and
DEL. DEL runs the plugins in reverse order. GC sends
``cni.dev/valid-attachments``. This module reimplements that, nothing more.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    returncode: int
    doc: Any
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def code(self) -> int | None:
        return self.doc.get("code") if isinstance(self.doc, dict) else None

    @property
    def msg(self) -> str:
        return str(self.doc.get("msg", "")) if isinstance(self.doc, dict) else ""


def exec_plugin(cni_path: str, plugin_type: str, command: str, conf: dict[str, Any] | bytes,
                *, container_id: str | None = None, netns: str | None = None,
                ifname: str | None = None, args: str = "", extra_env: dict[str, str] | None = None,
                timeout: float = 60.0, prefix: list[str] | None = None) -> Outcome:
    """Run one verb; ``prefix`` (e.g. an ``nsenter`` command) runs the plugin elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(extra_env or {})
    env["CNI_COMMAND"] = command
    env["CNI_PATH"] = cni_path
    if container_id is not None:
        env["CNI_CONTAINERID"] = container_id
    if netns is not None:
        env["CNI_NETNS"] = netns
    if ifname is not None:
        env["CNI_IFNAME"] = ifname
    if args:
        env["CNI_ARGS"] = args
    exe = None
    for d in cni_path.split(":"):
        if os.access(os.path.join(d, plugin_type), os.X_OK):
            exe = os.path.join(d, plugin_type)
            break
    assert exe is not None, f"no plugin {plugin_type} in {cni_path}"
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    proc = subprocess.run([*(prefix or []), exe], input=stdin, capture_output=True, env=env,
                          timeout=timeout)
    out = proc.stdout.decode()
    doc = json.loads(out) if out.strip() else None
    return Outcome(proc.returncode, doc, proc.stderr.decode())


@dataclass
class Runtime:
    """A minimal libcni: one configuration list, results cached per attachment."""

    cni_path: str
    conflist: dict[str, Any]
    extra_env: dict[str, str] = field(default_factory=dict)
    cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def _plugin_conf(self, plugin: dict[str, Any], runtime_config: dict[str, Any],
                     prev: Any) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.conflist["cniVersion"]
        caps = {k: v for k, v in runtime_config.items()
                if plugin.get("capabilities", {}).get(k)}
        if caps:
            conf["runtimeConfig"] = caps
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(self, container_id: str, netns: str, ifname: str = "eth0",
            runtime_config: dict[str, Any] | None = None, args: str = "") -> Outcome:
        prev = None
        out = Outcome(0, None, "")
        for plugin in self.conflist["plugins"]:
            conf = self._plugin_conf(plugin, runtime_config or {}, prev)
            out = exec_plugin(self.cni_path, plugin["type"], "ADD", conf,
                              container_id=container_id, netns=netns, ifname=ifname,
                              args=args, extra_env=self.extra_env)
            if not out.ok:
                return out
            prev = out.doc
        self.cache[(container_id, ifname)] = prev
        return out

    def check(self, container_id: str, netns: str, ifname: str = "eth0",
              runtime_config: dict[str, Any] | None = None) -> Outcome:
        prev = self.cache[(container_id, ifname)]
        out = Outcome(0, None, "")
        for plugin in self.conflist["plugins"]:
            conf = self._plugin_conf(plugin, runtime_config or {}, prev)
            out = exec_plugin(self.cni_path, plugin["type"], "CHECK", conf,
                              container_id=container_id, netns=netns, ifname=ifname,
                              extra_env=self.extra_env)
            if not out.ok:
                return out
        return out

    def delete(self, container_id: str, netns: str | None, ifname: str = "eth0",
               runtime_config: dict[str, Any] | None = None) -> Outcome:
        prev = self.cache.get((container_id, ifname))
        out = Outcome(0, None, "")
        for plugin in reversed(self.conflist["plugins"]):
            conf = self._plugin_conf(plugin, runtime_config or {}, prev)
            out = exec_plugin(self.cni_path, plugin["type"], "DEL", conf,
                              container_id=container_id, netns=netns, ifname=ifname,
                              extra_env=self.extra_env)
            if not out.ok:
                return out
        self.cache.pop((container_id, ifname), None)
        return out

    def gc(self, valid: list[tuple[str, str]]) -> Outcome:
        out = Outcome(0, None, "")
        for plugin in self.conflist["plugins"]:
            conf = self._plugin_conf(plugin, {}, None)
            conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": i}
                                                 for c, i in valid]
            out = exec_plugin(self.cni_path, plugin["type"], "GC", conf,
                              extra_env=self.extra_env)
            if not out.ok:
                return out
        return out
