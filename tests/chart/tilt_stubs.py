"""Evaluate a Tiltfile with a real Starlark interpreter (starlark-pyo3) and stub Tilt
builtins that record what the Tiltfile asks for instead of doing it.

The stubs have Tilt's own parameter names, so a misspelt keyword argument is an
error here as it is in Tilt. Only the parts of the API the project uses (plus
their close relatives) are provided; an unknown builtin fails the evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import starlark as sl

TRIGGER_MODE_AUTO = "TRIGGER_MODE_AUTO"
TRIGGER_MODE_MANUAL = "TRIGGER_MODE_MANUAL"

Value = Any  # what Starlark hands to Python: str, int, bool, None, list, dict


@dataclass
class DockerBuild:
    ref: str
    context: str
    dockerfile: str
    target: str
    live_update: list[dict[str, Value]]
    entrypoint: list[str] | str
    restart_file: str | None = None  # set by ext://restart_process
    only: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)


@dataclass
class HelmCall:
    chart: str
    name: str
    namespace: str
    values: list[str]
    set: list[str]


@dataclass
class K8sResource:
    workload: str
    port_forwards: list[dict[str, Value]]
    resource_deps: list[str]
    labels: list[str]


@dataclass
class LocalResource:
    name: str
    cmd: list[str] | str
    deps: list[str]
    resource_deps: list[str]


@dataclass
class Recorder:
    root: Path
    docker_builds: list[DockerBuild] = field(default_factory=list)
    helm_calls: list[HelmCall] = field(default_factory=list)
    k8s_yaml: list[Value] = field(default_factory=list)
    k8s_resources: list[K8sResource] = field(default_factory=list)
    local_resources: list[LocalResource] = field(default_factory=list)
    files_named: list[str] = field(default_factory=list)  # read, watched or applied
    loads: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)


def _as_list(value: Value) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


class TiltStubs:
    """The builtins a Tiltfile sees, bound to one :class:`Recorder`."""

    def __init__(self, root: Path) -> None:
        self.rec = Recorder(root=root)

    # -- images

    def docker_build(
        self,
        ref: str,
        context: str,
        build_args: dict[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        dockerfile_contents: str = "",
        live_update: list[dict[str, Value]] | None = None,
        match_in_env_vars: bool = False,
        ignore: list[str] | str | None = None,
        only: list[str] | str | None = None,
        entrypoint: list[str] | str | None = None,
        target: str = "",
        ssh: str = "",
        network: str = "",
        secret: str = "",
        extra_tag: str = "",
        container_args: list[str] | None = None,
        cache_from: list[str] | None = None,
        pull: bool = False,
        platform: str = "",
        extra_hosts: list[str] | None = None,
    ) -> None:
        self.rec.docker_builds.append(
            DockerBuild(
                ref=ref,
                context=context,
                dockerfile=dockerfile,
                target=target,
                live_update=list(live_update or []),
                entrypoint=entrypoint if entrypoint is not None else [],
                only=_as_list(only),
                ignore=_as_list(ignore),
            )
        )

    def docker_build_with_restart(
        self,
        ref: str,
        context: str,
        entrypoint: list[str] | str,
        live_update: list[dict[str, Value]],
        base_suffix: str = "-base",
        restart_file: str = "/.restart-proc",
        **kwargs: Value,
    ) -> None:
        """ext://restart_process: a docker_build whose process reruns after live update."""
        if not live_update:
            raise ValueError("docker_build_with_restart requires at least one live_update step")
        self.docker_build(ref, context, entrypoint=entrypoint, live_update=live_update, **kwargs)
        self.rec.docker_builds[-1].restart_file = restart_file

    def sync(self, local_path: str, remote_path: str) -> dict[str, Value]:
        return {"step": "sync", "local_path": local_path, "remote_path": remote_path}

    def run(
        self, cmd: str | list[str], trigger: list[str] | str | None = None, echo_off: bool = False
    ) -> dict[str, Value]:
        return {"step": "run", "cmd": cmd, "trigger": _as_list(trigger)}

    def fall_back_on(self, files: list[str] | str) -> dict[str, Value]:
        return {"step": "fall_back_on", "files": _as_list(files)}

    def initial_sync(self) -> dict[str, Value]:
        return {"step": "initial_sync"}

    # -- Kubernetes

    def helm(
        self,
        paths: str,
        name: str = "",
        namespace: str = "",
        values: list[str] | str | None = None,
        set: list[str] | str | None = None,  # Tilt's parameter name
        kube_version: str = "",
        skip_crds: bool = False,
    ) -> dict[str, Value]:
        self.rec.helm_calls.append(
            HelmCall(paths, name, namespace, _as_list(values), _as_list(set))
        )
        return {"blob": "helm", "index": len(self.rec.helm_calls) - 1}

    def blob(self, contents: str) -> dict[str, Value]:
        self.rec.blobs.append(contents)
        return {"blob": "text", "index": len(self.rec.blobs) - 1}

    def k8s_yaml(self, yaml: Value, allow_duplicates: bool = False) -> None:
        for item in _as_list(yaml):
            if isinstance(item, str):
                self.rec.files_named.append(item)
            self.rec.k8s_yaml.append(item)

    def k8s_resource(
        self,
        workload: str = "",
        new_name: str = "",
        port_forwards: Value = None,
        extra_pod_selectors: Value = None,
        trigger_mode: str = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        objects: list[str] | None = None,
        auto_init: bool = True,
        pod_readiness: str = "",
        links: Value = None,
        labels: list[str] | str | None = None,
        discovery_strategy: str = "",
    ) -> None:
        forwards: list[dict[str, Value]] = []
        for pf in _as_list(port_forwards):
            if isinstance(pf, int):
                forwards.append({"local_port": pf, "container_port": pf, "name": None})
            elif isinstance(pf, str):
                local, _, remote = pf.partition(":")
                forwards.append(
                    {"local_port": int(local), "container_port": int(remote or local), "name": None}
                )
            else:
                forwards.append(pf)
        self.rec.k8s_resources.append(
            K8sResource(workload, forwards, list(resource_deps or []), _as_list(labels))
        )

    def port_forward(
        self,
        local_port: int,
        container_port: int | None = None,
        name: str | None = None,
        link_path: str | None = None,
        host: str | None = None,
    ) -> dict[str, Value]:
        return {
            "local_port": local_port,
            "container_port": container_port if container_port is not None else local_port,
            "name": name,
        }

    def local_resource(
        self,
        name: str,
        cmd: list[str] | str = "",
        deps: list[str] | str | None = None,
        trigger_mode: str = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        ignore: list[str] | str | None = None,
        auto_init: bool = True,
        serve_cmd: list[str] | str = "",
        cmd_bat: list[str] | str = "",
        serve_cmd_bat: list[str] | str = "",
        allow_parallel: bool = False,
        links: Value = None,
        tags: list[str] | None = None,
        env: dict[str, str] | None = None,
        serve_env: dict[str, str] | None = None,
        readiness_probe: Value = None,
        dir: str = "",  # Tilt's parameter name
        serve_dir: str = "",
        labels: list[str] | str | None = None,
    ) -> None:
        self.rec.local_resources.append(
            LocalResource(name, cmd, _as_list(deps), list(resource_deps or []))
        )

    # -- files and settings

    def read_file(self, file_path: str, default: str | None = None) -> str:
        self.rec.files_named.append(file_path)
        path = self.rec.root / file_path
        if not path.exists() and default is not None:
            return default
        return path.read_text()

    def watch_file(self, file_path: str) -> None:
        self.rec.files_named.append(file_path)

    def allow_k8s_contexts(self, contexts: list[str] | str) -> None:
        return None

    def update_settings(
        self,
        max_parallel_updates: int = 3,
        k8s_upsert_timeout_secs: int = 30,
        suppress_unused_image_warnings: Value = None,
    ) -> None:
        return None

    def fail(self, msg: str) -> None:
        raise RuntimeError(f"Tiltfile called fail(): {msg}")

    def _getenv(self, key: str, default: str | None = None) -> str | None:
        return os.environ.get(key, default)

    def _exists(self, path: str) -> bool:
        self.rec.files_named.append(path)
        return (self.rec.root / path).exists()

    def _join(self, *parts: str) -> str:
        return os.path.join(*parts)

    # -- evaluation

    BUILTINS = (
        "docker_build",
        "sync",
        "run",
        "fall_back_on",
        "initial_sync",
        "helm",
        "blob",
        "k8s_yaml",
        "k8s_resource",
        "port_forward",
        "local_resource",
        "read_file",
        "watch_file",
        "allow_k8s_contexts",
        "update_settings",
        "fail",
    )
    EXTENSIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "ext://restart_process": ("docker_build_with_restart",),
    }

    def module(self) -> sl.Module:
        module = sl.Module()
        for name in self.BUILTINS:
            module.add_callable(name, getattr(self, name))
        module["TRIGGER_MODE_AUTO"] = TRIGGER_MODE_AUTO
        module["TRIGGER_MODE_MANUAL"] = TRIGGER_MODE_MANUAL
        for name in ("_getenv", "_exists", "_join"):
            module.add_callable(name, getattr(self, name))
        prelude = (
            "os = struct(name = 'posix', getcwd = lambda: _root, getenv = _getenv,"
            " path = struct(exists = _exists, join = _join))\n"
        )
        module["_root"] = str(self.rec.root)
        sl.eval(module, sl.parse("<tilt-prelude>", prelude, DIALECT), GLOBALS)
        return module

    def _load(self, module_id: str) -> sl.FrozenModule:
        self.rec.loads.append(module_id)
        if module_id not in self.EXTENSIONS:
            raise ValueError(f"unknown Tilt extension {module_id!r}")
        ext = sl.Module()
        for name in self.EXTENSIONS[module_id]:
            ext.add_callable(name, getattr(self, name))
        return ext.freeze()

    def evaluate(self, source: str, filename: str = "Tiltfile") -> Recorder:
        ast = sl.parse(filename, source, DIALECT)
        sl.eval(self.module(), ast, GLOBALS, sl.FileLoader(self._load))
        return self.rec


def _dialect() -> sl.Dialect:
    # Tilt's Starlark (starlark-go): def, lambda, load, no f-strings, no types.
    dialect = sl.Dialect.standard()
    dialect.enable_f_strings = False
    return dialect


DIALECT = _dialect()
GLOBALS = sl.Globals.extended_by(
    [sl.LibraryExtension.StructType, sl.LibraryExtension.Print, sl.LibraryExtension.Json]
)


def evaluate_tiltfile(path: Path) -> Recorder:
    return TiltStubs(path.parent).evaluate(path.read_text(), path.name)
