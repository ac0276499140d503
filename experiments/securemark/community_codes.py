"""Community relationship codes (SecureMark-DL Fig. 5): neighbourhood accuracy against code length 15-60 bits.

The paper evaluates on SNAP Facebook (4,039 nodes, 88,234 edges), Twitter and Google+; those files are not
available offline here, so the graphs are networkx planted partitions of Facebook's size (10 communities of
404 nodes, about 88k edges) at three difficulties (mean within- / between-community degree). With a local copy
of a SNAP file and its communities, pass --edges and --communities to run on it instead.

Metrics per code length (see nnmark.codes.community): neighbourhood accuracy = mean fraction of each node's
10 nearest codes (Hamming) in its own community (chance ~ 0.10 here); and the paper's reading of pairs within
Hamming distance 3 as 'same community' (precision, recall). The NMF+LLE embedding is computed once per graph
(``community_codes``) and hashed to each length with the same SimHash step ``community_codes`` uses.

Usage: python experiments/securemark/community_codes.py [--out experiments/results/securemark]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import networkx as nx
import numpy as np

from nnmark.codes.community import community_codes, neighbourhood_accuracy, pair_accuracy, simhash

GRAPHS = {  # name: (communities, size, p_in, p_out)
    "easy (in 40 / out 4)": (10, 404, 0.10, 4 / 3636),
    "medium (in 20 / out 10)": (10, 404, 0.05, 10 / 3636),
    "hard (in 12 / out 12)": (10, 404, 0.03, 12 / 3636),
}
LENGTHS = list(range(15, 61, 5))


def load_graphs(args):
    if args.edges:
        from nnmark.data.snap import load_communities, load_edge_list

        g = load_edge_list(args.edges)
        members = load_communities(args.communities)
        label = {n: i for i, com in enumerate(members) for n in com}
        keep = [n for n in g.nodes if n in label]
        g = g.subgraph(keep).copy()
        yield f"SNAP {Path(args.edges).name}", g, np.array([label[n] for n in g.nodes])
        return
    for i, (name, (l, s, p_in, p_out)) in enumerate(GRAPHS.items()):
        g = nx.planted_partition_graph(l, s, p_in, p_out, seed=100 + i)
        yield name, g, np.repeat(np.arange(l), s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/securemark"))
    ap.add_argument("--edges", type=Path, help="a SNAP edge list (optional)")
    ap.add_argument("--communities", type=Path, help="its SNAP community file (with --edges)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for name, g, y in load_graphs(args):
        t0 = time.perf_counter()
        cc = community_codes(g, 60, seed=0)
        t_embed = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        chance = neighbourhood_accuracy(rng.integers(0, 2, size=(len(y), 30)).astype(np.uint8), y)
        for b in LENGTHS:
            bits = simhash(cc.embedding, b, seed=0)
            pa = pair_accuracy(bits, y, radius=3)
            rows.append(
                {
                    "graph": name,
                    "nodes": g.number_of_nodes(),
                    "edges": g.number_of_edges(),
                    "bits": b,
                    "nbr_accuracy": neighbourhood_accuracy(bits, y),
                    "random_codes_nbr_accuracy": chance,  # 30 random bits a node
                    "precision_r3": pa["precision"],
                    "recall_r3": pa["recall"],
                    "embed_seconds": t_embed,
                }
            )
            print(rows[-1], flush=True)
    with open(args.out / "community_codes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["graph", "bits", "nbr_accuracy", "random_codes_nbr_accuracy", "precision_r3", "recall_r3"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    head = [
        "# Community relationship codes: neighbourhood accuracy vs code length",
        "",
        f"Graphs: {', '.join(sorted({r['graph'] for r in rows}))}; runtime {time.perf_counter() - t_all:.0f} s.",
        "",
    ]
    (args.out / "community_codes.md").write_text("\n".join(head + md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["graph"] for r in rows):
        sel = [r for r in rows if r["graph"] == name]
        ax.plot([r["bits"] for r in sel], [r["nbr_accuracy"] for r in sel], marker="o", label=name)
    ax.plot(
        LENGTHS, [np.mean([r["random_codes_nbr_accuracy"] for r in rows])] * len(LENGTHS), "k:", label="random codes"
    )
    ax.set_xlabel("code length (bits)")
    ax.set_ylabel("neighbourhood accuracy (10 nearest codes)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("CRC on Facebook-sized planted partitions")
    fig.tight_layout()
    fig.savefig(args.out / "community_codes.png", dpi=120)


if __name__ == "__main__":
    main()
