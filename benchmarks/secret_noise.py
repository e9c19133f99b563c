"""Cost of secret noise: OS-entropy Gaussians against torch's seeded generator, side by side.

python benchmarks/secret_noise.py --write
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

_common.setup()  # before torch: one thread; the repository's packages first

import torch  # noqa: E402
from results_file import replace_section  # noqa: E402

from maskdp.mechanism.randomness import SecretRandomness  # noqa: E402

HEADING = "## Secret noise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    secret, cpu = SecretRandomness(), torch.device("cpu")
    rows = []
    for n in (20_000, 100_000, 2_000_000):
        times: dict[str, list[float]] = {"secret": [], "seeded": []}
        for _ in range(args.reps):  # side by side, alternating
            start = time.perf_counter()
            secret.gaussian((n,), device=cpu)
            times["secret"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.randn(n)
            times["seeded"].append(time.perf_counter() - start)
        a, b = (statistics.median(times[k]) for k in ("secret", "seeded"))
        rows.append(f"| {n:,} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.1f}x |")
        print(rows[-1])
    body = "\n".join(
        [
            HEADING,
            "",
            f"`python benchmarks/secret_noise.py --write`: median of {args.reps} alternating "
            "draws, 1 thread, CPU shared with other jobs. The noise of one step has one "
            "coordinate per trained parameter; `maskdp.mechanism.randomness.SecretRandomness` reads 8 "
            "bytes of OS entropy per coordinate and applies Box-Muller in float64.",
            "",
            "| coordinates | secret (OS entropy) ms | torch.randn (seeded) ms | ratio |",
            "|---:|---:|---:|---:|",
            *rows,
        ]
    )
    if args.write:
        replace_section(_common.HERE / "RESULTS.md", HEADING, body)


if __name__ == "__main__":
    main()
