"""Token reduction steps as plain loops over nested Python lists, written from STORM's public code.

Maps are nested lists ``m[b][h][w] -> list of C floats``; ``sizes[b][h][w] -> float``. Everything walks
one sample, one row or column, one window at a time, in explicit order. Slow by design: tiny inputs only.

Conventions shared with the method descriptions (STORM's FixedWindowToMe2Dv2 / FixedWindowEViT2D,
R-MeeTo's ordered merge, ToP/HSA, MTR):
* a row budget is split over windows in proportion to window length: floor, then one extra unit to the
  windows with the largest fractional parts (earlier window first on ties);
* "most similar"/"most important" ties go to the lower index.
"""
from __future__ import annotations

import math
from fractions import Fraction

# ---------------------------------------------------------------------------------------------- helpers


def _similarity(a, b, kind):
    if kind == "l1":
        return -sum(abs(x - y) for x, y in zip(a, b))
    if kind == "l2":
        return -math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    if kind == "cosine":
        na = math.sqrt(sum(x * x for x in a)) + 1e-6
        nb = math.sqrt(sum(y * y for y in b)) + 1e-6
        return sum(x * y for x, y in zip(a, b)) / (na * nb)
    raise ValueError(kind)


def _importance(v, kind):
    if kind == "abs_mean":
        return sum(abs(x) for x in v) / len(v)
    if kind == "mean":
        return sum(v) / len(v)
    if kind == "l2":
        return math.sqrt(sum(x * x for x in v) / len(v))
    raise ValueError(kind)


def windows(n, size):
    """[(start, end)] of consecutive windows of ``size`` units covering n units."""
    size = max(1, min(size, n))
    out = []
    start = 0
    while start < n:
        out.append((start, min(start + size, n)))
        start += size
    return out


def spread(n, budget, size):
    """Budget per window, proportional to window length, largest fractional parts get the leftovers."""
    wins = windows(n, size)
    shares = [Fraction(budget * (e - s), n) for s, e in wins]
    counts = [math.floor(x) for x in shares]
    leftover = budget - sum(counts)
    order = sorted(range(len(wins)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1
    return wins, counts


def _best_first(scores, indices):
    """``indices`` sorted by descending score, the lower index first on ties."""
    return sorted(indices, key=lambda i: (-scores[i], i))


def _combine(a, b, sa, sb, mode):
    if mode == "sum":
        return [x + y for x, y in zip(a, b)], sa + sb
    if mode == "mean":
        return [(sa * x + sb * y) / (sa + sb) for x, y in zip(a, b)], sa + sb
    if mode == "drop":
        return list(b), sb
    raise ValueError(mode)


def _transpose(grid):
    return [list(col) for col in zip(*grid)]


# ------------------------------------------------------------------------------------------ STORM (ToMe)


def tome_line_pairs(line, budget, window, similarity):
    """Set of pair indices j (tokens 2j, 2j+1) that merge in one line."""
    n_pairs = len(line) // 2
    scores = [_similarity(line[2 * j], line[2 * j + 1], similarity) for j in range(n_pairs)]
    chosen = set()
    if n_pairs == 0:
        return chosen
    wins, counts = spread(n_pairs, budget, window)
    for (start, end), count in zip(wins, counts):
        chosen.update(_best_first(scores, range(start, end))[:count])
    return chosen


def tome_line(lines, sizes, pairs, mode):
    """Apply merged ``pairs`` to every tensor line in ``lines`` (same layout) with the line's ``sizes``."""
    out_lines = [[] for _ in lines]
    out_sizes = []
    t = 0
    length = len(sizes)
    while t < length:
        if t % 2 == 0 and t // 2 in pairs and t + 1 < length:
            for k, line in enumerate(lines):
                v, s = _combine(line[t], line[t + 1], sizes[t], sizes[t + 1], mode)
                out_lines[k].append(v)
            out_sizes.append(s)
            t += 2
        else:
            for k, line in enumerate(lines):
                out_lines[k].append(list(line[t]))
            out_sizes.append(sizes[t])
            t += 1
    return out_lines, out_sizes


def storm_tome(residual, branch, out_hw, window=5, similarity="l1", mode="sum", sizes=None):
    """Rows first (pairs along W), then columns of the result (pairs along H); plan on the residual."""
    out_h, out_w = out_hw
    res_out, br_out, size_out = [], [], []
    for b in range(len(residual)):
        h, w = len(residual[b]), len(residual[b][0])
        sz = sizes[b] if sizes is not None else [[1.0] * w for _ in range(h)]
        rows_r, rows_b, rows_s = [], [], []
        for i in range(h):
            pairs = tome_line_pairs(residual[b][i], w - out_w, window, similarity)
            (r, bb), s = tome_line([residual[b][i], branch[b][i]], sz[i], pairs, mode)
            rows_r.append(r)
            rows_b.append(bb)
            rows_s.append(s)
        cols_r, cols_b, cols_s = _transpose(rows_r), _transpose(rows_b), _transpose(rows_s)
        new_r, new_b, new_s = [], [], []
        for j in range(out_w):
            pairs = tome_line_pairs(cols_r[j], h - out_h, window, similarity)
            (r, bb), s = tome_line([cols_r[j], cols_b[j]], cols_s[j], pairs, mode)
            new_r.append(r)
            new_b.append(bb)
            new_s.append(s)
        res_out.append(_transpose(new_r))
        br_out.append(_transpose(new_b))
        size_out.append(_transpose(new_s))
    return res_out, br_out, size_out


# ------------------------------------------------------------------------------------------ STORM (EViT)


def evit_line_keep(scores, budget, window):
    """Indices kept in one line: each window drops its share of ``budget`` least important tokens."""
    wins, drops = spread(len(scores), budget, window)
    kept = []
    for (start, end), drop in zip(wins, drops):
        kept.extend(_best_first(scores, range(start, end))[: (end - start) - drop])
    return sorted(kept)


def storm_evit(residual, branch, out_hw, window=5, importance="abs_mean"):
    out_h, out_w = out_hw
    res_out, br_out = [], []
    for b in range(len(residual)):
        h, w = len(residual[b]), len(residual[b][0])
        rows_r, rows_b = [], []
        for i in range(h):
            scores = [_importance(v, importance) for v in residual[b][i]]
            keep = evit_line_keep(scores, w - out_w, window)
            rows_r.append([residual[b][i][k] for k in keep])
            rows_b.append([branch[b][i][k] for k in keep])
        cols_r, cols_b = _transpose(rows_r), _transpose(rows_b)
        new_r, new_b = [], []
        for j in range(out_w):
            scores = [_importance(v, importance) for v in cols_r[j]]
            keep = evit_line_keep(scores, h - out_h, window)
            new_r.append([cols_r[j][k] for k in keep])
            new_b.append([cols_b[j][k] for k in keep])
        res_out.append(_transpose(new_r))
        br_out.append(_transpose(new_b))
    return res_out, br_out


# ------------------------------------------------------------------------------- flattened baselines


def _flatten(grid):
    return [v for row in grid for v in row]


def _repack(seq, out_hw):
    out_h, out_w = out_hw
    assert len(seq) == out_h * out_w
    return [seq[i * out_w : (i + 1) * out_w] for i in range(out_h)]


def keep_top(residual, branch, out_hw, score_fn):
    """Keep the H'*W' best tokens of each flattened map by ``score_fn(sample_index, flat_index)``."""
    n = out_hw[0] * out_hw[1]
    res_out, br_out = [], []
    for b in range(len(residual)):
        r, bb = _flatten(residual[b]), _flatten(branch[b])
        scores = [score_fn(b, i) for i in range(len(r))]
        keep = sorted(_best_first(scores, range(len(r)))[:n])
        res_out.append(_repack([r[i] for i in keep], out_hw))
        br_out.append(_repack([bb[i] for i in keep], out_hw))
    return res_out, br_out


def evit(residual, branch, out_hw, importance="mean"):
    return keep_top(residual, branch, out_hw, lambda b, i: _importance(_flatten(residual[b])[i], importance))


def top(residual, branch, out_hw, signal=None):
    signal = branch if signal is None else signal
    return keep_top(residual, branch, out_hw, lambda b, i: sum(max(0.0, v) for v in _flatten(signal[b])[i]))


def _merge_groups(tensors, sizes, groups, length, mode):
    """``groups[t]`` = token that t is merged into (t itself if kept, None if dropped); order kept."""
    outs = [[] for _ in tensors]
    out_sizes = []
    for t in range(length):
        if groups[t] != t:
            continue
        members = [u for u in range(length) if groups[u] == t]
        total = sum(sizes[u] for u in members)
        for k, seq in enumerate(tensors):
            c = len(seq[t])
            if mode == "mean":
                outs[k].append([sum(sizes[u] * seq[u][d] for u in members) / total for d in range(c)])
            else:  # "sum" (and "drop", whose groups are singletons)
                outs[k].append([sum(seq[u][d] for u in members) for d in range(c)])
        out_sizes.append(total)
    return outs, out_sizes


def tome(residual, branch, out_hw, mode="mean", sizes=None):
    """R-MeeTo ordered bipartite merge on the flattened *branch*: A = even, B = odd positions."""
    n = out_hw[0] * out_hw[1]
    res_out, br_out, size_out = [], [], []
    for b in range(len(residual)):
        r, bb = _flatten(residual[b]), _flatten(branch[b])
        length = len(r)
        sz = _flatten(sizes[b]) if sizes is not None else [1.0] * length
        n_remove = length - n
        evens, odds = list(range(0, length, 2)), list(range(1, length, 2))
        best, best_score = {}, {}
        for a in evens:
            sims = [(_similarity(bb[a], bb[o], "cosine"), o) for o in odds]
            top_score = max(s for s, _ in sims)
            best[a] = min(o for s, o in sims if s == top_score)  # first maximum
            best_score[a] = top_score
        sources = _best_first(best_score, evens)[:n_remove]
        groups = list(range(length))
        for a in sources:
            groups[a] = None if mode == "drop" else best[a]
        (mr, mb), ms = _merge_groups([r, bb], sz, groups, length, "mean" if mode == "mean" else "sum")
        res_out.append(_repack(mr, out_hw))
        br_out.append(_repack(mb, out_hw))
        size_out.append(_repack(ms, out_hw))
    return res_out, br_out, size_out


def mtr(residual, branch, out_hw, delta, mode="mean"):
    """Δ ranks tokens: the r least important are sources, the best floor(n/2) of the rest are kept,
    the others are targets; each source is averaged into its most similar (cosine on residual) target."""
    n = out_hw[0] * out_hw[1]
    res_out, br_out = [], []
    for b in range(len(residual)):
        r, bb, d = _flatten(residual[b]), _flatten(branch[b]), _flatten(delta[b])
        length = len(r)
        ranked = _best_first(d, range(length))
        targets, sources = ranked[n // 2 : n], ranked[n:]
        groups = list(range(length))
        for s in sources:
            sims = [(_similarity(r[s], r[t], "cosine"), t) for t in targets]
            top_score = max(v for v, _ in sims)
            groups[s] = None if mode == "drop" else next(t for v, t in sims if v == top_score)
        (mr, mb), _ = _merge_groups([r, bb], [1.0] * length, groups, length, "mean" if mode == "mean" else "sum")
        res_out.append(_repack(mr, out_hw))
        br_out.append(_repack(mb, out_hw))
    return res_out, br_out

