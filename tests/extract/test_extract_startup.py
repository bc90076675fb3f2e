"""The worker's start-up imports only the 12 Hz tokenizer from qwen-tts, and still gets the
official codes.

``import qwen_tts`` runs the package's ``__init__``, which imports the whole TTS model stack and
the 25 Hz tokenizer: most of a job's start-up, for code that ``encode`` never runs. These tests
run the worker in a fresh process and look at what it imported, so the stack cannot creep back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.conftest import json_lines as _records
from tests.extract.conftest import SRC

from gpuspool.exitcodes import ExitCode
from gpuspool.extract.model import TOKENIZER_MODULES, TTS_STACK

pytest.importorskip("torch")
pytest.importorskip("qwen_tts")

#: Packages that the worker has no use for, which the full ``import qwen_tts`` (or transformers,
#: left to itself) pulls in.
NOT_NEEDED = ("sklearn", "scipy", "onnxruntime", "sox", "torchaudio", "numba", "pandas")

#: Runs the worker's command line in this process, then writes the names in ``sys.modules``.
RUN_AND_LIST = (
    "import json, sys\n"
    "from gpuspool.extract.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps(sorted(sys.modules)))\n"
    "sys.exit(code)\n"
)


def _python(
    *args: str | os.PathLike[str], first: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Python in a fresh process, our sources (after ``first``, if given) on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*([str(first)] if first else []), str(SRC), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, *[str(a) for a in args]], capture_output=True, text=True, env=env
    )


def test_worker_imports_only_the_12hz_tokenizer(
    dataset: Path, tiny_tokenizer: Path, official_tokenizer: Any, tmp_path: Path
) -> None:
    """A whole worker run, start to summary, in a fresh process: the tokenizer's two modules
    are imported, no part of the TTS model stack, the 25 Hz tokenizer, qwen-tts's package
    ``__init__`` or the unused optional packages is; and the codes are the official ones."""
    out = tmp_path / "out.jsonl"
    listing = tmp_path / "modules.json"
    t0 = time.monotonic()
    got = _python("-c", RUN_AND_LIST, listing, "--input", dataset, "--output", out,
                  "--tokenizer", tiny_tokenizer, "--device", "cpu")  # fmt: skip
    lifetime = time.monotonic() - t0
    assert got.returncode == 0, got.stderr[-2000:]
    # start-up is timed from the exec to the first batch sent to the device, so it holds the
    # imports and the load, and ends before the process does
    [summary] = [e for e in map(json.loads, got.stdout.splitlines()) if e["event"] == "summary"]
    assert summary["import_s"] + summary["model_load_s"] <= summary["startup_s"] < lifetime
    modules = set(json.loads(listing.read_text()))
    assert set(TOKENIZER_MODULES) <= modules
    qwen = sorted(m for m in modules if m.split(".")[0] == "qwen_tts")
    assert qwen == sorted(["qwen_tts.core.tokenizer_12hz", *TOKENIZER_MODULES])
    assert not [m for m in modules if m.startswith(TTS_STACK)]
    assert not [m for m in modules if m.split(".")[0] in NOT_NEEDED]

    base = dataset.parent
    inputs = _records(dataset)
    outputs = _records(out)
    assert [r["audio"] for r in outputs] == [r["audio"] for r in inputs]
    for inp, rec in zip(inputs, outputs, strict=True):
        codes = np.asarray(rec["audio_codes"])
        ref = official_tokenizer.encode([str(base / inp["audio"])]).audio_codes[0].numpy()
        assert codes.shape == ref.shape and codes.shape[1] == 16
        assert np.array_equal(codes[:-1], ref[:-1]), inp["audio"]


def test_official_wrapper_imports_after_the_worker_import(tiny_tokenizer: Path) -> None:
    """After the worker's import, ``import qwen_tts`` runs the real package and reuses the same
    module objects: the classes are one and the same, and both loads hold the same weights."""
    code = (
        "import sys, torch\n"
        "from gpuspool.extract.model import import_tokenizer_stack, load_tokenizer\n"
        "config, model = import_tokenizer_stack()\n"
        "assert 'qwen_tts' not in sys.modules and 'qwen_tts.core' not in sys.modules\n"
        "ours, rate = load_tokenizer(sys.argv[1], torch.float32)\n"
        "from qwen_tts import Qwen3TTSTokenizer, core\n"
        "assert core.Qwen3TTSTokenizerV2Model is model.Qwen3TTSTokenizerV2Model\n"
        "assert core.Qwen3TTSTokenizerV2Config is config.Qwen3TTSTokenizerV2Config\n"
        "official = Qwen3TTSTokenizer.from_pretrained(sys.argv[1], device_map='cpu')\n"
        "assert type(official.model) is type(ours)\n"
        "assert rate == official.feature_extractor.sampling_rate == 24000\n"
        "a, b = ours.state_dict(), official.model.state_dict()\n"
        "assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)\n"
        "print('ok')\n"
    )
    got = _python("-c", code, tiny_tokenizer)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.splitlines()[-1] == "ok"


def test_tokenizer_of_another_model_type_is_a_config_error(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """A folder whose config names another model type (the 25 Hz tokenizer's, say) is refused
    with exit 78, as a folder that is no tokenizer at all is."""
    other = tmp_path / "tok25"
    shutil.copytree(tiny_tokenizer, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "qwen3_tts_tokenizer_25hz"
    (other / "config.json").write_text(json.dumps(config))
    r = extract("--input", dataset, "--output", tmp_path / "o.jsonl", "--tokenizer", other,
                "--device", "cpu")  # fmt: skip
    assert r.code == ExitCode.CONFIG
    assert "cannot be loaded" in r.one("error")["reason"]


#: Packages a GPU host often has beside torch, which transformers' image and video utilities
#: import whenever they are installed (through ``modeling_layers``).
HOST_EXTRAS = {"torchvision": "0.24.1", "jax": "0.10.2", "flax": "0.12.8"}


def _broken_extras(site: Path) -> None:
    """Install a package for each of ``HOST_EXTRAS`` that fails when imported (as a broken or
    mismatched install does), with the metadata that makes transformers see it installed."""
    for name, version in HOST_EXTRAS.items():
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
        dist = site / f"{name}-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_torchvision_and_jax_beside_the_stack_are_not_imported(
    dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """With torchvision, JAX and Flax installed, transformers would import them (a second
    or more of start-up on a GPU host, and a failure where one is broken); the worker loads
    and encodes without importing any of them."""
    site = tmp_path / "site"
    _broken_extras(site)
    # transformers left to itself imports them: the stand-ins are found and fail.
    plain = _python("-c", "import transformers.modeling_layers", first=site)
    assert plain.returncode != 0 and "imported" in plain.stderr
    out = tmp_path / "out.jsonl"
    listing = tmp_path / "modules.json"
    got = _python("-c", RUN_AND_LIST, listing, "--input", dataset, "--output", out,
                  "--tokenizer", tiny_tokenizer, "--device", "cpu", first=site)  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    modules = set(json.loads(listing.read_text()))
    assert not [m for m in modules if m.split(".")[0] in HOST_EXTRAS]
    assert len(_records(out)) == len(_records(dataset))
