"""What importing liger-kernel costs `chop eval --kernels liger`'s model loading: its import as chop makes it
(``chop.models.kernels.liger``: without peft, which liger imports where installed only to recognise PEFT-wrapped
modules) against a plain import, in fresh processes, alternating, after the imports `chop eval` makes first.

    python benchmarks/liger_import.py [--repeats 5]

Prints a table of medians and writes liger_import.json (to $OUT, else benchmarks/results/).
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys

import torch
from common import result_path

WAYS = {
    "plain": "import liger_kernel.transformers.monkey_patch",
    "chop": "from chop.models.kernels import liger; liger('liger_kernel.transformers.monkey_patch')",
}
PROBE = ("import time, sys; import chop.eval.eval_cli; t0 = time.perf_counter(); {way}; "
         "print(time.perf_counter() - t0, 'peft' in sys.modules)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from chop.provenance import provenance

    # Untimed: bytecode compiled, files in the page cache.
    subprocess.run([sys.executable, "-c", PROBE.format(way=WAYS["plain"])], check=True, stdout=subprocess.DEVNULL)
    runs = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, code in WAYS.items():
            out = subprocess.run([sys.executable, "-c", PROBE.format(way=code)], check=True, capture_output=True,
                                 text=True).stdout.split()
            runs[way].append({"seconds": float(out[0]), "peft_imported": out[1] == "True"})
    median = {way: statistics.median(r["seconds"] for r in rs) for way, rs in runs.items()}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peft = importlib.util.find_spec("peft") is not None
    note = f"after `import chop.eval.eval_cli` in each process; peft installed: {peft}"
    out = result_path("liger_import.json")
    prov = provenance(None, {"none": "imports alone: no model, no data"}, note=note)
    out.write_text(json.dumps({"provenance": prov, "gpu": gpu, "peft_installed": peft, "median_s": median,
                               "runs": runs}, indent=2))
    print(f"liger-kernel's import, {gpu}, medians of {args.repeats} fresh processes (peft installed: {peft}):")
    print("| import | seconds | peft imported |\n|---|---:|---|")
    for way, rs in runs.items():
        print(f"| {'plain' if way == 'plain' else 'chop (peft hidden)'} | {median[way]:.2f} | "
              f"{rs[0]['peft_imported']} |")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
