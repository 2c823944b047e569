"""Switchboard's own rules for the files under deploy/, which generic linters
cannot know: the configuration each deployment hands the daemon passes
`switchboard check-config`, probes point at /healthz and /readyz, stop
timeouts leave room for the drain, selectors match, nothing runs as root.

Run by scripts/lint-deploy (which installs PyYAML with yamllint):

    python policy.py --repo ROOT --switchboard BIN SECTION [--compose-json FILE]

SECTION is systemd, docker, compose or kubernetes. Prints one line per rule
checked; exits 1 if any rule fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

TOKEN = "lint-deploy-placeholder-token-0123456789"


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}{': ' + why if why else ''}")
        return ok


def seconds(text: str) -> float:
    """A Switchboard or systemd duration ("30s", "5m", "500ms", "45") in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[unit]


def default_drain(repo: Path) -> float:
    with open(repo / "config/switchboard.toml", "rb") as f:
        return seconds(tomllib.load(f)["shutdown"]["drain_timeout"])


def check_config(
    r: Report,
    what: str,
    binary: Path,
    env: dict[str, str],
    config_text: str | None = None,
) -> None:
    """Runs `switchboard check-config` on config_text (or the built-in
    defaults) with exactly env as the SWITCHBOARD__ environment."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(binary), "check-config"]
        if config_text is not None:
            path = Path(tmp) / "switchboard.toml"
            path.write_text(config_text)
            args.append(str(path))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD__")}
        clean.pop("RUST_LOG", None)
        clean.update(env)
        p = subprocess.run(args, env=clean, capture_output=True, text=True, cwd=tmp)
        out = (p.stdout + p.stderr).strip().replace("\n", "; ")
        r.check(p.returncode == 0, f"{what}: switchboard check-config accepts it", out)


class Remap:
    """Materialises files the deployment mounts (secrets, config) under a
    temporary root and rewrites absolute paths to point there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefixes: list[str] = []

    def add_file(self, path: str, content: str) -> None:
        dest = self.root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
        self.add_prefix(path)

    def add_prefix(self, path: str) -> None:
        self.prefixes.append(path.rstrip("/"))
        self.prefixes.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if not self.prefixes:
            return text
        # One pass, longest prefix first, so a rewritten path is not rewritten again.
        alt = "|".join(re.escape(p) for p in self.prefixes)
        pattern = rf"(?<![\w/.-])(?:{alt})(?=/|\"|'|$|\s)"
        return re.sub(pattern, lambda m: str(self.root) + m.group(0), text)


# ---------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd(r: Report, repo: Path, binary: Path, _: argparse.Namespace) -> None:
    unit_path = repo / "deploy/systemd/switchboard.service"
    unit = parse_unit(unit_path)
    svc = unit.get("Service", {})

    def one(key: str) -> str:
        return (svc.get(key) or [""])[-1]

    r.check(one("Type") == "notify", "Type=notify (readiness through sd_notify)", one("Type"))
    r.check(one("NotifyAccess") == "main", "NotifyAccess=main", one("NotifyAccess"))
    r.check(one("WatchdogSec") != "" and seconds(one("WatchdogSec")) > 0, "WatchdogSec is set")
    r.check(one("Restart") == "on-failure", "Restart=on-failure", one("Restart"))
    r.check(one("User") not in ("", "root", "0"), "runs as a dedicated user", one("User"))
    r.check(one("ProtectSystem") == "strict", "ProtectSystem=strict", one("ProtectSystem"))
    r.check(one("NoNewPrivileges") == "yes", "NoNewPrivileges=yes")
    r.check(one("StateDirectory") == "switchboard", "StateDirectory=switchboard")
    drain = default_drain(repo)
    stop = seconds(one("TimeoutStopSec") or "90s")
    r.check(stop > drain, f"TimeoutStopSec ({stop:g}s) > shutdown.drain_timeout ({drain:g}s)")
    r.check("78" in one("RestartPreventExitStatus").split(), "no restart loop on a configuration error (exit 78)")
    argv = shlex.split(one("ExecStart"))
    r.check(argv[1:2] == ["run"] and "--config" in argv, "ExecStart runs `switchboard run --config ...`", one("ExecStart"))

    sysusers = (repo / "deploy/systemd/switchboard.sysusers").read_text()
    r.check(
        re.search(rf"^u\s+{re.escape(one('User'))}\s", sysusers, re.M) is not None,
        "the sysusers file creates the unit's User",
    )

    with tempfile.TemporaryDirectory() as tmp:
        creds = Path(tmp) / "credentials"
        creds.mkdir()
        for spec in svc.get("LoadCredential", []):
            name = spec.split(":", 1)[0]
            (creds / name).write_text(TOKEN + "\n")
        env: dict[str, str] = {}
        for line in svc.get("Environment", []):
            for word in shlex.split(line):
                k, _, v = word.partition("=")
                env[k] = v.replace("%d", str(creds)).replace("%S", "/var/lib")
        # The documented config is what the install step copies to /etc.
        check_config(r, "unit environment + config/switchboard.toml", binary, env,
                     (repo / "config/switchboard.toml").read_text())
        example = {}
        for line in (repo / "deploy/systemd/switchboard.env.example").read_text().splitlines():
            m = re.fullmatch(r"#?\s*(SWITCHBOARD__\w+)=(.*)", line.strip())
            if m:
                example[m.group(1)] = m.group(2)
        r.check(bool(example), "switchboard.env.example names settings")
        check_config(r, "unit environment + every setting of switchboard.env.example", binary,
                     {**env, **example}, (repo / "config/switchboard.toml").read_text())


# ---------------------------------------------------------------- docker


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def docker(r: Report, repo: Path, binary: Path, _: argparse.Namespace) -> None:
    instr = parse_dockerfile(repo / "deploy/docker/Dockerfile")
    froms = [i for i, (k, _) in enumerate(instr) if k == "FROM"]
    r.check(len(froms) >= 2, "multi-stage build", f"{len(froms)} FROM")
    final = instr[froms[-1]:]
    base = final[0][1].split()[0]
    r.check(base.startswith("gcr.io/distroless/"), "final image is distroless (no shell, no package manager)", base)
    users = [a for k, a in final if k == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    r.check(uid not in ("0", "root"), "final stage runs as a non-root user", uid or "no USER")
    r.check(not any(k == "RUN" for k, _ in final), "final stage runs nothing at build time (nothing installed)")
    # distroless/cc has glibc, libgcc and OpenSSL but no zlib, which
    # librdkafka links: the build must link it statically.
    build_env = " ".join(a for k, a in instr[: froms[-1]] if k == "ENV")
    r.check("LIBZ_SYS_STATIC=1" in build_env.split(), "build links zlib statically (the runtime image has no libz)")
    env: dict[str, str] = {}
    for k, a in final:
        if k == "ENV":
            for word in shlex.split(a):
                name, _, value = word.partition("=")
                env[name] = value
    listen = env.get("SWITCHBOARD__HTTP__LISTEN", "")
    exposed = [a for k, a in final if k == "EXPOSE"]
    r.check(bool(listen) and listen.rsplit(":", 1)[-1] in " ".join(exposed).split(),
            "EXPOSE matches SWITCHBOARD__HTTP__LISTEN", f"{listen} vs {exposed}")
    r.check(listen.startswith("0.0.0.0:"), "listens on all interfaces inside the container", listen)
    entry = [json.loads(a) for k, a in final if k == "ENTRYPOINT"]
    r.check(entry[-1:] == [["/usr/local/bin/switchboard"]], "ENTRYPOINT is the daemon in exec form")
    check_config(r, "image environment + built-in defaults", binary, env)


# ---------------------------------------------------------------- compose


def compose(r: Report, repo: Path, binary: Path, args: argparse.Namespace) -> None:
    doc = json.loads(Path(args.compose_json).read_text())
    services = doc.get("services", {})
    for name in ("kafka", "postgres", "topics", "switchboard"):
        r.check(name in services, f"service {name} exists")
    if r.failed:
        return
    kafka, pg, topics, sb = (services[n] for n in ("kafka", "postgres", "topics", "switchboard"))
    r.check(kafka.get("image", "").startswith("apache/kafka:"), "Kafka is the Apache Kafka image", kafka.get("image"))
    r.check("broker,controller" in str(kafka.get("environment", {}).get("KAFKA_PROCESS_ROLES")), "Kafka runs KRaft (broker and controller in one node)")
    r.check(pg.get("image", "").startswith("postgres:"), "PostgreSQL is the postgres image", pg.get("image"))
    for name in ("kafka", "postgres"):
        r.check("test" in services[name].get("healthcheck", {}), f"{name} has a healthcheck")
    r.check(topics.get("command") == ["topics", "create"], "topics runs `switchboard topics create`")
    r.check(topics.get("restart") in ("no", None), "topics is one-shot (restart: no)")
    dep = sb.get("depends_on", {})
    r.check(dep.get("topics", {}).get("condition") == "service_completed_successfully", "switchboard starts after topics succeeded")
    r.check(dep.get("postgres", {}).get("condition") == "service_healthy", "switchboard starts after PostgreSQL is healthy")
    r.check(topics.get("depends_on", {}).get("kafka", {}).get("condition") == "service_healthy", "topics starts after Kafka is healthy")
    drain = default_drain(repo)
    for svc_name, svc in (("topics", topics), ("switchboard", sb)):
        user = str(svc.get("user", "0")).split(":")[0]
        r.check(user not in ("0", "root", ""), f"{svc_name} runs as a non-root user", user)
        r.check(svc.get("read_only") is True, f"{svc_name} has a read-only root filesystem")
        r.check("ALL" in svc.get("cap_drop", []), f"{svc_name} drops every capability")
    grace = seconds(sb.get("stop_grace_period", "10s"))
    r.check(grace > drain, f"stop_grace_period ({grace:g}s) > shutdown.drain_timeout ({drain:g}s)")
    for port in sb.get("ports", []):
        r.check(port.get("host_ip") == "127.0.0.1", f"port {port.get('published')} is published on loopback only")
    env = {k: str(v) for k, v in (sb.get("environment") or {}).items()}
    r.check(env.get("SWITCHBOARD__BUS__BACKEND") == "kafka", "switchboard uses the Kafka bus")
    r.check(env.get("SWITCHBOARD__STORE__BACKEND") == "postgres", "switchboard uses the PostgreSQL store")
    with tempfile.TemporaryDirectory() as tmp:
        remap = Remap(Path(tmp))
        for s in sb.get("secrets", []):
            source = doc.get("secrets", {}).get(s["source"], {})
            value = os.environ.get(source.get("environment", ""), TOKEN)
            remap.add_file(s.get("target") or f"/run/secrets/{s['source']}", value + "\n")
        for v in sb.get("volumes", []):
            remap.add_prefix(v["target"])
        env = {k: remap(v) for k, v in env.items() if k.startswith("SWITCHBOARD__")}
        check_config(r, "switchboard service environment + built-in defaults", binary, env)
        topics_env = {k: str(v) for k, v in (topics.get("environment") or {}).items() if k.startswith("SWITCHBOARD__")}
        check_config(r, "topics service environment + built-in defaults", binary, topics_env)


# ---------------------------------------------------------------- kubernetes


def kubernetes(r: Report, repo: Path, binary: Path, _: argparse.Namespace) -> None:
    kdir = repo / "deploy/kubernetes"
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    listed = set(kust.get("resources", []))
    present = {p.name for p in kdir.glob("*.yaml")} - {"kustomization.yaml"}
    r.check(listed == present, "kustomization.yaml lists every manifest", f"listed {sorted(listed)}, present {sorted(present)}")

    objs: dict[str, list[dict]] = {}
    for name in sorted(present):
        for doc in yaml.safe_load_all((kdir / name).read_text()):
            if doc:
                objs.setdefault(doc["kind"], []).append(doc)
    for kind in ("Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"):
        r.check(kind in objs, f"a {kind} is defined")
    if r.failed:
        return
    cms = {o["metadata"]["name"]: o for o in objs["ConfigMap"]}
    secrets = {o["metadata"]["name"]: o for o in objs["Secret"]}

    def secret_value(name: str, key: str) -> str | None:
        s = secrets.get(name)
        if s is None:
            return None
        if key in (s.get("stringData") or {}):
            return s["stringData"][key]
        if key in (s.get("data") or {}):
            import base64

            return base64.b64decode(s["data"][key]).decode()
        return None

    for dep in objs["Deployment"]:
        name = dep["metadata"]["name"]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        sel = spec["selector"]["matchLabels"]
        r.check(sel.items() <= labels.items(), f"deployment/{name}: selector matches the pod labels")
        psc = pod.get("securityContext", {})
        r.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"deployment/{name}: pods run as non-root")
        r.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"deployment/{name}: seccomp RuntimeDefault")
        r.check(pod.get("automountServiceAccountToken") is False, f"deployment/{name}: no service account token mounted")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        containers = pod.get("initContainers", []) + pod["containers"]
        for c in containers:
            cname = f"deployment/{name} container {c['name']}"
            sc = c.get("securityContext", {})
            r.check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: read-only root filesystem")
            r.check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: no privilege escalation")
            r.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: drops every capability")
            r.check(bool(c.get("resources", {}).get("limits", {}).get("memory")), f"{cname}: memory limit set")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    r.check(secret_value(ref["name"], ref["key"]) is not None, f"{cname}: env {e['name']} refers to an existing secret key {ref['name']}/{ref['key']}")
            for m in c.get("volumeMounts", []):
                r.check(m["name"] in volumes, f"{cname}: volume {m['name']} is defined")
        for v in volumes.values():
            if "configMap" in v:
                r.check(v["configMap"]["name"] in cms, f"deployment/{name}: ConfigMap {v['configMap']['name']} exists")
            if "secret" in v:
                sname = v["secret"]["secretName"]
                # Secret files belong to root (group fsGroup): the non-root
                # user reads them only through the group or other bits.
                mode = v["secret"].get("defaultMode", 0o644)
                readable = mode & 0o004 or (mode & 0o040 and psc.get("fsGroup") is not None)
                r.check(bool(readable), f"deployment/{name}: secret volume {v['name']} is readable by the pod's user", oct(mode))
                for item in v["secret"].get("items", []):
                    r.check(secret_value(sname, item["key"]) is not None, f"deployment/{name}: secret key {sname}/{item['key']} exists")

        main = pod["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
        live = main.get("livenessProbe", {}).get("httpGet", {})
        ready = main.get("readinessProbe", {}).get("httpGet", {})
        r.check(live.get("path") == "/healthz", f"deployment/{name}: liveness probe on /healthz", str(live))
        r.check(ready.get("path") == "/readyz", f"deployment/{name}: readiness probe on /readyz", str(ready))
        for probe in (live, ready):
            port = probe.get("port")
            r.check(port in ports or port in ports.values(), f"deployment/{name}: probe port {port} is a container port")
        r.check(main.get("args", [])[:1] == ["run"], f"deployment/{name}: main container runs `switchboard run`")

        # The configuration the pod sees, checked by the daemon itself.
        cfg_mount = next((m for m in main["volumeMounts"] if m["mountPath"].endswith(".toml")), None)
        r.check(cfg_mount is not None, f"deployment/{name}: a switchboard.toml is mounted")
        if cfg_mount is None:
            continue
        cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
        toml_text = cms[cm_name]["data"][cfg_mount.get("subPath", "switchboard.toml")]
        cfg = tomllib.loads(toml_text)
        r.check(cfg_mount["mountPath"] in main["args"], f"deployment/{name}: `run --config` names the mounted file")
        replicas = spec.get("replicas", 1)
        if replicas > 1:
            r.check(cfg.get("bus", {}).get("backend") == "kafka", f"deployment/{name}: {replicas} replicas need bus.backend = \"kafka\"")
            r.check(cfg.get("store", {}).get("backend") == "postgres", f"deployment/{name}: {replicas} replicas need store.backend = \"postgres\"")
        listen_port = int(cfg.get("http", {}).get("listen", "127.0.0.1:8080").rsplit(":", 1)[1])
        r.check(cfg.get("http", {}).get("listen", "").startswith("0.0.0.0:"), f"deployment/{name}: http.listen is on all interfaces")
        r.check(listen_port in ports.values(), f"deployment/{name}: container port matches http.listen ({listen_port})")
        drain = seconds(cfg.get("shutdown", {}).get("drain_timeout", "30s"))
        pre = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        r.check(grace > drain + pre, f"deployment/{name}: terminationGracePeriodSeconds ({grace}) > preStop ({pre}) + drain_timeout ({drain:g})")

        with tempfile.TemporaryDirectory() as tmp:
            remap = Remap(Path(tmp))
            for m in main["volumeMounts"]:
                v = volumes[m["name"]]
                if "secret" in v:
                    sname = v["secret"]["secretName"]
                    for item in v["secret"].get("items", []):
                        remap.add_file(f"{m['mountPath']}/{item['path']}", secret_value(sname, item["key"]) or "")
                elif "emptyDir" in v:
                    remap.add_prefix(m["mountPath"])
            env = {}
            for e in main.get("env", []):
                if "value" in e:
                    env[e["name"]] = remap(str(e["value"]))
                elif ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    env[e["name"]] = secret_value(ref["name"], ref["key"]) or ""
            check_config(r, f"deployment/{name}: ConfigMap {cm_name} + pod environment", binary, env, remap(toml_text))
        for init in pod.get("initContainers", []):
            r.check(init.get("image") == main.get("image"), f"deployment/{name}: init container {init['name']} uses the daemon's image")

        pod_labels = labels
        for svc in objs["Service"]:
            r.check(svc["spec"]["selector"].items() <= pod_labels.items(), f"service/{svc['metadata']['name']}: selector matches deployment/{name}'s pods")
            for p in svc["spec"]["ports"]:
                t = p.get("targetPort", p["port"])
                r.check(t in ports or t in ports.values(), f"service/{svc['metadata']['name']}: targetPort {t} is a container port")
        for pdb in objs["PodDisruptionBudget"]:
            r.check(pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), f"pdb/{pdb['metadata']['name']}: selector matches deployment/{name}'s pods")
            max_un = pdb["spec"].get("maxUnavailable")
            r.check(max_un is not None and int(max_un) < replicas, f"pdb/{pdb['metadata']['name']}: leaves pods running during a drain")


SECTIONS = {"systemd": systemd, "docker": docker, "compose": compose, "kubernetes": kubernetes}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--switchboard", required=True, type=Path)
    ap.add_argument("--compose-json")
    args = ap.parse_args()
    r = Report()
    SECTIONS[args.section](r, args.repo.resolve(), args.switchboard.resolve(), args)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
