"""The extraction worker's start-up phases, one by one, in fresh processes (warm page cache).

Each mode runs in its own process and prints one JSON line of phase times (seconds):

* ``serial``: ``import torch``; the CUDA driver's start (``torch.cuda.init``); the context (a
  first tensor on the device); cuDNN (a first convolution); cuBLAS (a first matrix product);
  the tokenizer's modules; ``from_pretrained`` on the CPU; the move to the device; the warm-up;
* ``thread``: the worker's order: the device's start in a thread (``DeviceStart``) while the
  main thread imports the tokenizer's modules; the import's time beside it shows whether the
  device's start holds the interpreter lock;
* ``thread+cuinit``: the same, the thread first calling the driver's ``cuInit`` through ctypes,
  which lets go of the interpreter lock while the driver starts.

``--importtime`` adds the worker's slowest imports (``python -X importtime``, as
``bench/worker_startup.py`` reports them).

    PYTHONPATH=SITE:src python3 bench/startup_phases.py --tokenizer DIR [--runs 2] [--importtime]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"


def child(mode: str, tokenizer: str, device_spec: str) -> dict[str, Any]:
    """Run one mode in this process; return its phase times."""
    sys.path.insert(0, str(SRC))
    from gpuspool.extract.startup import process_age_s

    out: dict[str, Any] = {"mode": mode, "interpreter_s": process_age_s()}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = round(now - t, 3)
        t = now

    import torch

    lap("import_torch")
    from gpuspool.extract import model as m

    lap("import_gpuspool_model")
    device = torch.device(device_spec)
    cuda = device.type == "cuda"

    def device_start(times: dict[str, float], cuinit: bool) -> None:
        s = time.perf_counter()
        if cuinit:
            import ctypes

            ctypes.CDLL("libcuda.so.1").cuInit(0)
            times["cuinit_ctypes"] = round(time.perf_counter() - s, 3)
            s = time.perf_counter()
        torch.cuda.init()
        times["cuda_init"] = round(time.perf_counter() - s, 3)
        s = time.perf_counter()
        x = torch.ones((1, 1, 64), device=device)
        torch.cuda.synchronize(device)
        times["context"] = round(time.perf_counter() - s, 3)
        s = time.perf_counter()
        torch.nn.functional.conv1d(x, torch.ones((1, 1, 3), device=device))
        torch.cuda.synchronize(device)
        times["cudnn"] = round(time.perf_counter() - s, 3)
        s = time.perf_counter()
        torch.matmul(x[0].T, x[0])
        torch.cuda.synchronize(device)
        times["cublas"] = round(time.perf_counter() - s, 3)

    dev_times: dict[str, float] = {}
    if mode == "serial" and cuda:
        device_start(dev_times, False)
        out.update(dev_times)
        t = time.perf_counter()
    thread = None
    if mode.startswith("thread") and cuda:
        import threading

        thread = threading.Thread(target=device_start, args=(dev_times, mode.endswith("cuinit")))
        thread.start()
    m.import_tokenizer_stack()
    lap("import_tokenizer_stack")
    if thread is not None:
        thread.join()
        lap("wait_device_start")
        out.update({f"thread_{k}": v for k, v in dev_times.items()})
    model, _ = m.load_tokenizer(tokenizer, torch.float32)
    lap("from_pretrained_cpu")
    model.decoder = None
    model = model.to(device).eval()
    m.keep_shape_buffers_on_host(model.encoder)
    if cuda:
        torch.cuda.synchronize(device)
    lap("to_device")
    import numpy as np

    x = torch.from_numpy(np.zeros((2, 25 * 1920), dtype=np.float32)).to(device)
    with torch.inference_mode():
        model.encoder.encode(input_values=x.unsqueeze(1), num_quantizers=16, return_dict=True)
    if cuda:
        torch.cuda.synchronize(device)
    lap("warm_up")
    out["total_s"] = process_age_s()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["serial", "thread", "thread+cuinit"])
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.tokenizer, a.device)), flush=True)
        return
    for _ in range(a.runs):
        for mode in a.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--tokenizer", a.tokenizer]
            proc = subprocess.run(
                [*cmd, "--device", a.device], capture_output=True, text=True, check=False
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            print(lines[-1] if lines else json.dumps({"mode": mode, "error": proc.stderr[-800:]}))
    if a.importtime:
        from worker_startup import importtime_top

        print("\n".join(importtime_top(30)))


if __name__ == "__main__":
    main()
