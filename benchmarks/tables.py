"""The tables `bench.py --full` prints, and the words its ratio rows use.

Every ratio row reads one way: nanopali's speed relative to the peer (time to first token and load
inverted, decode rates as they are), "1.25x faster" or "1.12x slower", never "0.89x faster".
"""


def speed(ratio: float) -> str:
    """A speed ratio (nanopali's speed / the peer's; > 1 = nanopali faster) in words that cannot be misread."""
    if ratio != ratio or ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def speed_row(ours: dict, peer: dict, batches) -> list[str]:
    """The ratio row of the default table: {batch: (time to first token s, decode tok/s)} of each side →
    [first-token speed at batches[0], decode speed per batch], all as nanopali's speed over the peer's."""
    b0 = batches[0]
    return [speed(peer[b0][0] / ours[b0][0])] + [speed(ours[b][1] / peer[b][1]) if peer[b][1] else "n/a"
                                                  for b in batches]


def footprint(ratio: float) -> str:
    """nanopali's memory / the peer's, in words."""
    if ratio != ratio or ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x more" if ratio > 1 else f"{1 / ratio:.2f}x less"


def print_full_table(rows, batches):
    b0 = batches[0]
    print(f"\n| model | mode | implementation | load s | time to first token s (batch {b0}) | "
          + " | ".join(f"decode tok/s b{b}" for b in batches)
          + f" | resident GB | % of GEMV floor (b{b0}) | % of memory floor (b{b0}) |")
    print("|---|---|---|---|---|" + "---|" * len(batches) + "---|---|---|")
    for title, mode, res, (floor, memory) in rows:
        cells = {}
        for name, r in res.items():
            cells[name] = [r["load_s"], r[b0][0]] + [r[b][1] for b in batches] + [r["resident_gb"]]
            pct = f"{100 * r[b0][1] / floor:.0f}%" if floor and r[b0][1] == r[b0][1] else "n/a"
            mem = f"{100 * r[b0][1] / memory:.0f}%" if r[b0][1] == r[b0][1] else "n/a"
            print(f"| {title} | {mode} | {name} | "
                  + " | ".join("n/a" if v != v else f"{v:.2f}" for v in cells[name]) + f" | {pct} | {mem} |")
        if floor:
            print(f"| {title} | {mode} | floor at the GEMV rate | | | " + " | ".join(
                f"{b * floor:.2f}" for b in batches) + " | | 100% | |")
        print(f"| {title} | {mode} | floor at the memory read rate | | | " + " | ".join(
            f"{b * memory:.2f}" for b in batches) + " | | | 100% |")
        if len(cells) == 2:
            (peer, p), (_, o) = cells.items()
            # speeds: load and first token are times (peer / nanopali), decode is a rate (nanopali / peer)
            ratios = [speed(p[0] / o[0]), speed(p[1] / o[1])] + [
                speed(x / y) if y > 0 else "n/a" for x, y in zip(o[2:-1], p[2:-1])] + [footprint(o[-1] / p[-1])]
            print(f"| {title} | {mode} | nanopali vs {peer.split()[0]} | " + " | ".join(ratios) + " | | |")
    print("\nvs rows: nanopali against the peer, as speed (load, first token, decode: faster / slower) and "
          "resident memory (more / less). The floor at batch b is b x the batch-1 floor (each decode step "
          "reads every weight once).")
