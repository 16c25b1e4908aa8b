#!/usr/bin/env python
"""Whether two bundles hold the same ONNX graphs, op for op (not a test): for every stage of A and B, the nodes in
order (op type, domain, attributes, input and output names), the graph inputs and outputs, and every initializer's
bytes. Prints one line per stage and exits 1 on any difference. For refactors that must not change a graph:
export the same model with the old and the new code, then

    python benchmarks/graph_diff.py old/fp32 new/fp32 [old/int8 new/int8 ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _graph(path: Path):
    import onnx
    m = onnx.load(str(path), load_external_data=True)
    return m.graph


def _attrs(node) -> list:
    import onnx
    out = []
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = (v.data_type, tuple(v.dims), onnx.numpy_helper.to_array(v).tobytes())
        elif isinstance(v, list):
            v = tuple(x if not isinstance(x, bytes) else x for x in v)
        out.append((a.name, v))
    return out


def diff_graphs(a: Path, b: Path) -> list[str]:
    """-> the differences between two ONNX files (empty: the same graph)."""
    import onnx
    ga, gb = _graph(a), _graph(b)
    out = []
    na, nb = list(ga.node), list(gb.node)
    if len(na) != len(nb):
        out.append(f"{len(na)} vs {len(nb)} nodes")
    for i, (x, y) in enumerate(zip(na, nb)):
        kx = (x.op_type, x.domain, list(x.input), list(x.output), _attrs(x))
        ky = (y.op_type, y.domain, list(y.input), list(y.output), _attrs(y))
        if kx != ky:
            out.append(f"node {i}: {x.op_type}{list(x.input)} vs {y.op_type}{list(y.input)}")
            break
    for what in ("input", "output"):
        sa = [onnx.helper.printable_value_info(v) for v in getattr(ga, what)]
        sb = [onnx.helper.printable_value_info(v) for v in getattr(gb, what)]
        if sa != sb:
            out.append(f"graph {what}s differ")
    ia = {t.name: (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in ga.initializer}
    ib = {t.name: (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in gb.initializer}
    if set(ia) != set(ib):
        out.append(f"initializer names differ ({len(set(ia) ^ set(ib))})")
    bad = [k for k in set(ia) & set(ib) if ia[k] != ib[k]]
    if bad:
        out.append(f"{len(bad)} initializers differ, e.g. {sorted(bad)[0]}")
    return out


def diff_bundles(a: Path, b: Path) -> tuple[bool, list[str]]:
    ma = json.loads((a / "edgemm.json").read_text())
    mb = json.loads((b / "edgemm.json").read_text())
    lines, same = [], True
    if set(ma["stages"]) != set(mb["stages"]):
        return False, [f"stages differ: {sorted(ma['stages'])} vs {sorted(mb['stages'])}"]
    for stage in ma["stages"]:
        fa, fb = ma["stages"][stage]["file"], mb["stages"][stage]["file"]
        if not fa.endswith(".onnx"):
            continue
        d = diff_graphs(a / fa, b / fb)
        same &= not d
        n = len(_graph(a / fa).node)
        lines.append(f"{a.name}:{stage}: " + ("same graph" if not d else "DIFFERENT: " + "; ".join(d)) + f" ({n} nodes)")
    return same, lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) % 2:
        print(__doc__)
        return 2
    ok = True
    for a, b in zip(args[::2], args[1::2]):
        same, lines = diff_bundles(Path(a), Path(b))
        ok &= same
        print("\n".join(lines))
    print("all the same" if ok else "differences found")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
