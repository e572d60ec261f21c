"""Load checkpoint folders with GPTQModel's own loader on CPU; write logits and dense weights to safetensors.

Runs with the python of the GPTQModel venv (``bash .ci/install-gptqmodel`` builds it; see
tests/export/test_interop_gptqmodel.py), never with ours: it imports nothing from ``compress``. Usage::

    python _gptqmodel_driver.py < SPEC.json

It imports GPTQModel first and only then reads the spec from stdin, so a caller can start it before the
folders exist and overlap GPTQModel's import with its own work. SPEC::

    {"ids": "ids.safetensors", "results": "results.json",
     "jobs": [{"name": ..., "folder": ..., "backend": ..., "dtype": ..., "out": "out.safetensors"}, ...]}

For each job the folder is loaded with ``GPTQModel.load(folder, device="cpu", backend=..., dtype=...)``, the
token ids are run through ``model.model`` (the transformers module GPTQModel wraps), and ``out`` gets
``logits`` plus ``weight.<module name>`` (``[out, in]``) for every ``TorchLinear`` (as GPTQModel's dequantizer
gives it, the one its forward uses) and every plain ``nn.Linear`` (e.g. what compressed-tensors decompressed).
``results`` gets the versions and, per job, ``{"ok", "kernels", "seconds"}`` or ``{"ok": false, "error",
"traceback"}``: a folder GPTQModel refuses is recorded with its exception, so the test can say which layout
was refused and why.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    started = time.time()
    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import load_file, save_file

    imported = time.time() - started
    spec = json.load(sys.stdin)
    ids = load_file(spec["ids"])["ids"]
    results = {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__, "import_s": round(imported, 2),
               "jobs": {}}
    for job in spec["jobs"]:
        t0 = time.time()
        try:
            model = GPTQModel.load(job["folder"], device="cpu", backend=BACKEND(job["backend"]),
                                   dtype=getattr(torch, job["dtype"]))
            inner = model.model
            tensors = {}
            kernels = {}
            with torch.no_grad():
                tensors["logits"] = inner(ids).logits.float().contiguous()
                for name, module in inner.named_modules():
                    if isinstance(module, BaseQuantLinear):
                        kernels[name] = type(module).__name__
                        if type(module).__name__ == "TorchLinear":
                            tensors[f"weight.{name}"] = module.dequantize_weight().t().contiguous()
                    elif isinstance(module, torch.nn.Linear):
                        tensors[f"weight.{name}"] = module.weight.detach().contiguous()
            save_file(tensors, job["out"])
            entry = {"ok": True, "kernels": kernels}
        except Exception as exc:  # recorded for the test to report, with GPTQModel's own message
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.time() - t0, 2)
        results["jobs"][job["name"]] = entry
    results["total_s"] = round(time.time() - started, 2)
    Path(spec["results"]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
