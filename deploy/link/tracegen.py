"""Make the two shipped synthetic rate traces (nothing downloaded): `python -m deploy.link.tracegen`.

- cellular-drive.down / .up (Mahimahi format): a car on LTE. The rate is a random walk in
  log space (sigma 0.15 per 100 ms, pulled back to a 6 Mbit/s down / 2 Mbit/s up mean),
  clipped to [0.3, 20] Mbit/s, with a 0.5-1.5 s handover outage (rate 0) every 8-14 s.
- wifi-congested.csv (time,kbit): a shared Wi-Fi cell. 20 Mbit/s idle with 2 Mbit/s of
  noise; congestion episodes (1-3 s each, 30% of the time) drop it to 1-4 Mbit/s.
Seeded (numpy default_rng(20)), 30 s each; the files in deploy/traces/ are this script's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEP_S = 0.1
SECONDS = 30
PACKET_BITS = 1500 * 8


def cellular(rng: np.random.Generator, mean_kbit: float) -> np.ndarray:
    """kbit/s per 100 ms step: log random walk around mean_kbit with handover outages."""
    n = int(SECONDS / STEP_S)
    log_mean, x = np.log(mean_kbit), np.log(mean_kbit)
    rates = np.empty(n)
    for i in range(n):
        x += 0.1 * (log_mean - x) + rng.normal(0, 0.15)
        rates[i] = np.clip(np.exp(x), 300, 20_000)
    t = rng.uniform(8, 14)
    while t < SECONDS:
        a = int(t / STEP_S)
        rates[a : a + int(rng.uniform(0.5, 1.5) / STEP_S)] = 0
        t += rng.uniform(8, 14)
    return rates


def wifi(rng: np.random.Generator) -> np.ndarray:
    """kbit/s per 100 ms step: 20 Mbit/s with noise, congestion episodes at 1-4 Mbit/s."""
    n = int(SECONDS / STEP_S)
    rates = np.clip(rng.normal(20_000, 2_000, n), 5_000, None)
    i = 0
    while i < n:
        i += int(rng.exponential(3.5) / STEP_S) + 1
        length = int(rng.uniform(1, 3) / STEP_S)
        rates[i : i + length] = rng.uniform(1_000, 4_000)
        i += length
    return rates


def mahimahi_lines(rates: np.ndarray) -> list[str]:
    """Packet-delivery ms stamps giving these per-step rates (credit carried across steps)."""
    out, credit = [], 0.0
    for i, kbit in enumerate(rates):
        credit += kbit * STEP_S * 1000 / PACKET_BITS  # packets this step may carry
        k = int(credit)
        credit -= k
        start = int(i * STEP_S * 1000)
        out += [str(start + int(j * STEP_S * 1000 / max(k, 1))) for j in range(k)]
    last = int(len(rates) * STEP_S * 1000)
    return [*out, str(last)]  # the final stamp sets the period


def main(argv: list[str] | None = None) -> int:
    """Write the traces into the folder given (default deploy/traces)."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "traces"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20)
    (out / "cellular-drive.down").write_text("\n".join(mahimahi_lines(cellular(rng, 6_000))) + "\n")
    (out / "cellular-drive.up").write_text("\n".join(mahimahi_lines(cellular(rng, 2_000))) + "\n")
    rows = [f"{i * STEP_S:.1f},{r:.0f}" for i, r in enumerate(wifi(rng))]
    (out / "wifi-congested.csv").write_text("time,kbit\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}/cellular-drive.down, cellular-drive.up, wifi-congested.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
