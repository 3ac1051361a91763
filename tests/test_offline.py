"""The offline guarantee: edge-t2t indexes and searches with no network at all, and its code has no
way to reach one.

- End to end in a network namespace with no interfaces (`unshare -n`; root, or `unshare -rn` where
  user namespaces are allowed); that test fails when neither is permitted.
- The same commands, separately, with socket.socket replaced by a function that raises (weaker:
  it only covers Python sockets, but needs no privilege).
- Statically: no module of the package imports a network client (ast walk).
- Dynamically: importing every module of the package loads no network client module.
- llama-cpp-python itself imports urllib to fetch image URLs; our guard is that vlm.py only ever
  hands it data: URIs, checked by driving VLM.generate with a stand-in llama object.
"""

from __future__ import annotations

import ast
import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers_media as hm
import pytest

PACKAGE = hm.ROOT / "edge_t2t"
# Modules that open network connections, or exist to. (`urllib.parse` and `html` are text
# utilities and are allowed; `urllib.request` is not.)
NETWORK_MODULES = {
    "socket", "ssl", "http", "http.client", "http.server", "urllib.request", "urllib3", "requests", "httpx",
    "aiohttp", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc", "websockets", "websocket",
    "huggingface_hub", "asyncio", "socketserver", "grpc", "paramiko",
}  # fmt: skip
NOSOCKET = (
    "import socket, sys\n"
    "def _refuse(*a, **k):\n"
    "    raise OSError('network disabled by test_offline')\n"
    "class _NoSocket(socket.socket):  # a class, so ssl.SSLSocket can still subclass it\n"
    "    def __init__(self, *a, **k):\n"
    "        _refuse()\n"
    "socket.socket = _NoSocket\n"
    "socket.create_connection = _refuse\n"
    "socket.getaddrinfo = _refuse\n"
    "sys.argv[0] = 'edge-t2t'\n"
    "from edge_t2t.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _isolation() -> list[str] | None:
    """The command prefix that runs a command with no network, or None (test_bundle uses it too)."""
    return _isolation_and_why()[0]


def _isolation_and_why() -> tuple[list[str] | None, str]:
    """The command prefix that runs a command with no network, or None and why none works."""
    if not shutil.which("unshare"):
        return None, "the `unshare` command is not installed (util-linux)"
    tried = []
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        probe = subprocess.run(
            [*prefix, sys.executable, "-c",
             "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\nexcept OSError:\n    print('isolated')"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == "isolated":
            return prefix, ""
        tried.append(f"`{' '.join(prefix)}`: rc {probe.returncode} {(probe.stderr or probe.stdout).strip()[-200:]}")
    return None, "; ".join(tried)


def _index_and_search(argv_prefix: list[str], rsicd_samples: Path, tmp_path: Path) -> None:
    """index (test VLM) + search + verify, each command started as `argv_prefix + ARGS`."""
    model, mmproj = hm.test_vlm_files()
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(rsicd_samples.glob("*.jpg")):
        shutil.copy(p, images / p.name)
    env = hm.child_env(tmp_path / "cache")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(var, None)  # nothing may depend on these

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv_prefix, *args], capture_output=True, text=True, env=env, cwd=hm.ROOT, timeout=hm.HANG_S)

    index = tmp_path / "idx"
    # one variant and room for the longest schema-valid answer: the seeded test VLM describes every image
    res = run("index", str(images), "--index", str(index), "--vlm", str(model), "--mmproj", str(mmproj),
              "--variants", "1", "--max-tokens", "1300", "--json", "--no-progress")  # fmt: skip
    assert res.returncode == 0 and not hm.has_traceback(res.stderr), res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert (summary["added"], summary["failed"]) == (len(list(images.glob("*.jpg"))), 0), summary["failures"]
    res = run("search", "a residential area with trees", "--index", str(index), "--json", "-k", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    hits = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(hits) == 3 and all(Path(h["image"]).parent == images.resolve() for h in hits)
    res = run("verify", "--index", str(index))
    assert res.returncode == 0, res.stdout + res.stderr


def test_index_and_search_in_a_network_namespace(rsicd_samples: Path, tmp_path: Path) -> None:
    """docs/reliability.md's claim: the whole job runs in a network namespace without interfaces. This fails
    (never skips) when the namespace cannot be made: CI runs as root with util-linux, and a skip
    here would be a green run that proved nothing about the offline guarantee."""
    prefix, why = _isolation_and_why()
    if prefix is None:
        pytest.fail(f"cannot make a network namespace ({why}): run the tests as root, or allow unprivileged "
                    f"user namespaces (sysctl kernel.unprivileged_userns_clone=1) so `unshare -rn` works")  # fmt: skip
    _index_and_search([*prefix, sys.executable, "-m", "edge_t2t"], rsicd_samples, tmp_path)


def test_index_and_search_with_sockets_refused(rsicd_samples: Path, tmp_path: Path) -> None:
    """The weaker check that runs anywhere: socket.socket, create_connection and getaddrinfo raise
    in the CLI process (covers Python sockets only; the namespace test above covers the rest)."""
    _index_and_search([sys.executable, "-c", NOSOCKET], rsicd_samples, tmp_path)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__",
        ) and node.args and isinstance(node.args[0], ast.Constant):  # fmt: skip
            found.add(str(node.args[0].value))
    return found


def _is_network(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in NETWORK_MODULES)


def test_no_module_imports_a_network_client() -> None:
    """Every import statement in the package, top level or inside functions."""
    offenders = {}
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        bad = sorted(n for n in _imports(path) if _is_network(n))
        if bad:
            offenders[str(path.relative_to(hm.ROOT))] = bad
    assert offenders == {}, f"network imports in the package: {offenders}"


def test_importing_the_package_loads_no_network_client() -> None:
    """Import every module of the package in a fresh interpreter and list the network modules that
    appeared. The baseline is what the interpreter and our pinned dependencies' *import-time* code
    already load (numpy, sqlite3, json, pathlib...): only what our imports add is attributed to us.
    Heavy libraries are imported inside functions, so they are not loaded here; the end-to-end test
    above covers them at run time with the network really gone."""
    code = (
        "import sys, json, pkgutil, importlib\n"
        "import numpy, sqlite3, pathlib, hashlib, dataclasses, argparse\n"
        "before = set(sys.modules)\n"
        "import edge_t2t\n"
        "names = [m.name for m in pkgutil.walk_packages(edge_t2t.__path__, 'edge_t2t.')\n"
        "         if not m.name.endswith('__main__')]  # importing __main__ would run the CLI\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(json.dumps({'modules': names, 'added': sorted(set(sys.modules) - before)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=hm.ROOT, timeout=120,
                         env=hm.child_env(hm.ROOT / ".pytest_cache" / "unused"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert "edge_t2t.cli" in out["modules"] and len(out["modules"]) > 10
    network = sorted(m for m in out["added"] if _is_network(m))
    assert network == [], f"importing edge_t2t loaded network modules: {network}"


def test_vlm_hands_llama_cpp_only_data_uris() -> None:
    """VLM.generate with a stand-in for the llama object: the image must travel as a data: URI
    whose payload is exactly the given bytes (any other URL would make llama-cpp-python fetch it)."""
    from edge_t2t.describe import vlm

    seen: list[dict] = []

    class FakeLlama:
        def create_chat_completion(self, messages, **kwargs):
            seen.append({"messages": messages, **kwargs})
            return {"choices": [{"message": {"content": "{}"}}]}

    obj = vlm.VLM.__new__(vlm.VLM)  # skip loading: only the message building is under test
    obj._llama = FakeLlama()
    obj.cfg = vlm.VLMConfig(model=Path("m.gguf"), mmproj=Path("p.gguf"), seed=3)
    obj.model_path = Path("m.gguf")
    obj.supports_grammar = True
    obj.variant_mode = "sequential"  # generate() is the sequential path
    obj.calls = 0
    obj.n_ctx = 4096
    png = hm.make_png(hm.ROOT / ".pytest_cache" / "offline_probe.png", 1).read_bytes()
    for mime in ("image/png", "image/jpeg"):
        obj.generate(png, "describe", mime=mime)
    urls = [part["image_url"]["url"] for call in seen for m in call["messages"] for part in m["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"]  # fmt: skip
    assert len(urls) == 2
    for url, mime in zip(urls, ("image/png", "image/jpeg"), strict=True):
        assert url.startswith(f"data:{mime};base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == png
    obj._llama = None  # nothing to close


def test_nothing_refers_to_a_model_hub() -> None:
    """No hub download APIs and no reliance on HF_HUB_OFFLINE-style switches: the models are built
    locally (embedder from an installed package's files, test VLM generated)."""
    needles = ("huggingface_hub", "hf_hub_download", "snapshot_download", "from_pretrained", "HF_HUB_OFFLINE",
               "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "urlopen", "urlretrieve")  # fmt: skip
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        hits += [f"{path.relative_to(hm.ROOT)}: {n}" for n in needles if n in text]
    assert hits == [], hits


@pytest.mark.linux_only  # reads /proc
def test_no_sockets_left_open_by_a_search(tmp_path: Path) -> None:
    """A process that ran a whole `search` (the CLI's main, in-process: the embedder, the vector
    snapshot, SQLite) holds no socket file descriptor afterwards, and found what it looked for."""
    captions = tmp_path / "caps.jsonl"
    captions.write_text(json.dumps({"image": "river.jpg", "variants": ["a river crosses a green forest"]}) + "\n"
                        + json.dumps({"image": "port.jpg", "variants": ["ships moored in a harbour"]}) + "\n")
    env = hm.child_env(tmp_path / "cache")
    res = hm.run_cli("index", "--captions", str(captions), "--index", str(tmp_path / "ix"), "--no-progress", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    code = (
        "import io, json, os, sys, contextlib\n"
        "from edge_t2t.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    rc = main(['search', 'boats in a harbour', '--index', {str(tmp_path / 'ix')!r}, '--json', '-k', '1'])\n"
        "links = []\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps({'rc': rc, 'hits': out.getvalue(), 'fds': links}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=hm.ROOT, timeout=hm.HANG_S,
                         env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["rc"] == 0 and json.loads(got["hits"])["image"] == "port.jpg", got["hits"]
    assert not [ln for ln in got["fds"] if ln.startswith("socket:")], got["fds"]
