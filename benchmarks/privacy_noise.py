"""The noise multiplier z each sampling scheme needs for a target epsilon (docs/privacy.md).

Run ``python -m benchmarks.privacy_noise``: for each federation below and each target epsilon,
the smallest z (to 0.1 %) that fedssd's own calibration
(:func:`fedssd.federation.accounting.calibrate_noise`, dp-accounting's RDP accountant) finds for

- ``fixed``: ``m`` of ``K`` clients without replacement, replace-one adjacency
  (``federation.sampling = "fixed"``, the default);
- ``poisson``: each client with probability ``q = m / K``, add/remove adjacency
  (``federation.sampling = "poisson"``, the DP-FedAvg convention);

and the standard deviation of the noise on the mean, ``z C / m``, in units of the clip norm C.
Every client every round (``m = K``) is the same mechanism under both.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from fedssd.federation.accounting import calibrate_noise, round_charge


@dataclasses.dataclass(frozen=True)
class Federation:
    """A federation to calibrate for: K clients, m per round (expected m under Poisson)."""

    name: str
    num_clients: int
    per_round: int
    rounds: int


FEDERATIONS = (
    Federation("grid fmnist-privacy", 10, 10, 5),
    Federation("1,000 clients", 1_000, 100, 100),
    Federation("10,000 clients", 10_000, 100, 1_000),
)
EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-5


def noise_multiplier(federation: Federation, scheme: str, epsilon: float, delta: float) -> float:
    """The smallest z for ``federation`` under ``scheme`` at (``epsilon``, ``delta``)."""
    charge = round_charge(
        num_clients=federation.num_clients,
        fraction=federation.per_round / federation.num_clients,
        sampling="poisson" if scheme == "poisson" else "fixed",
        noise_multiplier=0.0,
    )
    return calibrate_noise([], charge, federation.rounds, epsilon, delta)


def table(
    federations: tuple[Federation, ...] = FEDERATIONS,
    epsilons: tuple[float, ...] = EPSILONS,
    delta: float = DELTA,
) -> list[str]:
    """The table's markdown lines."""
    lines = [
        "| federation | K | m per round | rounds | epsilon | z fixed (replace-one) "
        "| z Poisson (add/remove) | z C / m fixed | z C / m Poisson |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fed in federations:
        for epsilon in epsilons:
            fixed = noise_multiplier(fed, "fixed", epsilon, delta)
            poisson = noise_multiplier(fed, "poisson", epsilon, delta)
            lines.append(
                f"| {fed.name} | {fed.num_clients:,} | {fed.per_round:,} | {fed.rounds:,} "
                f"| {epsilon:g} | {fixed:.3f} | {poisson:.3f} | {fixed / fed.per_round:.4f} "
                f"| {poisson / fed.per_round:.4f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=DELTA)
    args = parser.parse_args()
    started = time.perf_counter()
    print("\n".join(table(delta=args.delta)))
    print(f"\ndelta = {args.delta:g}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
