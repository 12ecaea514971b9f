"""Can a learned scorer choose the right region of a mask better than its probability mass?
(issue 13: the bundled model often draws the asked object among several and keeps the wrong one.)

For each ``<seg>`` of world conversations (oracle history, the bundled model), the 8-connected
regions of its frame logits (> 0) are described by their geometry and probabilities (area,
centre, box, mass, mean, peak, [REF] logit, overlap with and offset from the referred mask), the
decoder's features pooled under them (its modulated features, the image encoder's, the pixels'
attribute classes) and the mask's own [SEG] query and named classes. A scorer (an MLP per region,
one self-attention layer across a mask's regions, the log mass as a skip term) is fitted on the
train split's masks to pick the region that overlaps the target best (cross-entropy over the
regions), and compared with the bundled rule (most mass) on validation and test: the region each
picks, and cIoU in the decoder's frame before the edge filter.

    python scripts/region_scorer.py [--train 4000] [--val 192] [--test 200] [--steps 3000] [--small]

``--small``: the scorer sees only the geometry and the attribute classes (fewer inputs, against
overfitting). Takes ~10 minutes on one thread (capturing 4,000 conversations ~6).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segllm.data.records import WorldConversations
from segllm.decoders.base import REF, SEG, logits_to_frame, mask_to_frame
from segllm.default import load_model

GEO = 15  # geometric and probability columns first in each region's features; column 7: log mass


def _regions(on: np.ndarray) -> list[np.ndarray]:
    """[H, W] bool -> flat pixel indices of each 8-connected region."""
    h, w = on.shape
    seen = np.zeros_like(on)
    out = []
    for y0, x0 in zip(*np.nonzero(on)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pix = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            pix.append(y * w + x)
            for yy in (y - 1, y, y + 1):
                for xx in (x - 1, x, x + 1):
                    if 0 <= yy < h and 0 <= xx < w and on[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(np.array(pix))
    return out


def capture(model, split: str, n: int) -> list[dict]:
    """Per <seg> of world ``split`` conversations 0..n-1: its regions' features ([R, GEO + F + D
    + T]), each region's pixel count and overlap with the target, the target's pixel count, the
    mask's [SEG] query [F] and named classes [T]."""
    dec = model.decoder
    cap: dict = {}
    hooks = [
        dec.register_forward_pre_hook(lambda m, a, kw: cap.update(feats=a[0], bidx=a[2], refs=kw.get("ref_masks")), with_kwargs=True),
        dec.out_norm.register_forward_hook(lambda m, a, o: cap.update(x=o)),
        dec.queries[SEG].register_forward_hook(lambda m, a, o: cap.update(qs=o)),
        dec.ref_query.register_forward_hook(lambda m, a, o: cap.update(rq=o)),
        dec.prompt_attributes.register_forward_hook(lambda m, a, o: cap.update(named=o)),
    ]
    groups = list(dec.config.attributes.values())
    d, p, f = dec.prompt_dim, dec.packed_channels, dec.config.fuse_dim

    def by_group(v):
        cuts = np.cumsum([0] + groups)
        return torch.cat([torch.softmax(v[..., a:b].float(), -1) for a, b in zip(cuts[:-1], cuts[1:])], -1)

    data = WorldConversations(split, n, seed=0)
    records = []
    with torch.no_grad():
        for a in range(0, n, 16):
            convs = [data[i] for i in range(a, min(n, a + 16))]
            batch = model.prepare(convs, targets=False).to(model.device)
            out, _ = model.decode_segs(model.hidden_states(batch), batch)
            x, q = cap["x"].float(), (cap["qs"] + cap["rq"]).float()
            named = by_group(cap["named"])
            pix_attr = by_group(cap["feats"][:, d + p + f :].permute(0, 2, 3, 1))
            enc = cap["feats"][:, :d].float()
            s = 0
            for b, (conv, e) in enumerate(zip(convs, batch.encoded)):
                fr, k = batch.frames[b], len(e.segs)
                if not k:
                    continue
                seg = logits_to_frame(out.mask_logits[s : s + k, SEG], fr).float().numpy()
                ref_logit = logits_to_frame(out.mask_logits[s : s + k, REF], fr).float().numpy()
                side = fr.size
                for j, item in enumerate(e.segs):
                    nth = sum(1 for it in e.segs[:j] if it.round_index == item.round_index)
                    target = mask_to_frame(torch.from_numpy(conv.rounds[item.round_index].masks[nth]), fr).numpy().reshape(-1)
                    lg = seg[j].reshape(-1)
                    prob = 1 / (1 + np.exp(-lg.astype(np.float64)))
                    ref = F.interpolate(cap["refs"][s + j].float()[None, None], size=(side, side))[0, 0].numpy().reshape(-1)
                    has_ref = float(ref.sum() > 0)
                    ry, rx = np.divmod(np.nonzero(ref > 0.5)[0], side)
                    rc = (rx.mean() / side, ry.mean() / side) if len(rx) else (0.0, 0.0)
                    rows, inter, area = [], [], []
                    g = int(cap["bidx"][s + j])  # the prompt's image in the batch
                    for reg in _regions(seg[j] > 0):
                        yy, xx = np.divmod(reg, side)
                        m = np.zeros(side * side, np.float32)
                        m[reg] = 1
                        w = F.adaptive_avg_pool2d(torch.from_numpy(m.reshape(1, 1, side, side)), x.shape[-1])[0, 0]
                        ws = w.sum().clamp(min=1e-6)
                        mass = prob[reg].sum()
                        geo = [len(reg) / side**2, np.log(len(reg)), xx.mean() / side, yy.mean() / side, (np.ptp(xx) + 1) / side,
                               (np.ptp(yy) + 1) / side, mass, np.log(mass), prob[reg].mean(), lg[reg].max(),
                               ref_logit[j].reshape(-1)[reg].mean(), ref[reg].mean(), has_ref, xx.mean() / side - rc[0], yy.mean() / side - rc[1]]
                        rows.append(torch.cat([torch.tensor(geo, dtype=torch.float32), (x[s + j] * w).sum((1, 2)) / ws,
                                               (enc[g] * w).sum((1, 2)) / ws, (pix_attr[g] * w[..., None]).sum((0, 1)) / ws]))
                        inter.append(int(target[reg].sum()))
                        area.append(len(reg))
                    width = GEO + x.shape[1] + d + pix_attr.shape[-1]
                    records.append(dict(conversation=a + b, target=int(target.sum()), q=q[s + j], named=named[s + j], inter=torch.tensor(inter),
                                        area=torch.tensor(area), feats=torch.stack(rows) if rows else torch.zeros(0, width)))
                s += k
    for h in hooks:
        h.remove()
    return records


def _iou(r: dict) -> torch.Tensor:
    return r["inter"].float() / (r["area"] + r["target"] - r["inter"]).float()


def report(records: list[dict], picks: list[int], name: str) -> None:
    """cIoU of the picked regions (a mask without regions adds its target to the union) and how
    often the pick is the best region among masks of two or more regions."""
    inter = union = hits = ambiguous = 0
    for r, k in zip(records, picks):
        if not len(r["area"]):
            union += r["target"]
            continue
        inter += int(r["inter"][k])
        union += int(r["area"][k] + r["target"] - r["inter"][k])
        if len(r["area"]) > 1 and _iou(r).max() > 0:
            ambiguous += 1
            hits += int(_iou(r)[k] == _iou(r).max())
    print(f"  {name}: cIoU {100 * inter / max(union, 1):.2f}, best region kept in {hits} of {ambiguous} masks of several regions")


class Scorer(nn.Module):
    """Regions [M, R, C] of M masks (with the masks' query [M, Fq] and named classes [M, T]) ->
    scores [M, R]."""

    def __init__(self, widths: tuple[int, int, int, int], small: bool, hidden: int = 128) -> None:
        super().__init__()
        geo, fq, enc, attrs = widths
        self.widths, self.small = widths, small
        hidden = 32 if small else hidden
        n_in = geo + 2 * attrs if small else geo + 3 * fq + enc + 3 * attrs
        self.inp = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.att = nn.MultiheadAttention(hidden, 2 if small else 4, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.mass = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, q, named, pad):
        geo, fq, enc, _ = self.widths
        g, px, pe, pa = x.split([geo, fq, enc, x.shape[-1] - geo - fq - enc], -1)
        qq, nn_ = q[:, None].expand(-1, x.shape[1], -1), named[:, None].expand(-1, x.shape[1], -1)
        parts = [g, pa * nn_, nn_] if self.small else [g, px, px * qq, qq, pe, pa, pa * nn_, nn_]
        z = self.inp(torch.cat(parts, -1))
        z = self.norm(z + self.att(z, z, z, key_padding_mask=pad)[0])
        return (self.out(z)[..., 0] + self.mass * x[..., 7]).masked_fill(pad, -1e9)


def _stack(records, stats=None):
    """Padded [M, R, C] features (standardised; the log mass raw), queries, named classes, padding."""
    rs = max(len(r["area"]) for r in records)
    x = torch.zeros(len(records), rs, records[0]["feats"].shape[1])
    pad = torch.ones(len(records), rs, dtype=torch.bool)
    for i, r in enumerate(records):
        x[i, : len(r["area"])] = r["feats"]
        pad[i, : len(r["area"])] = False
    if stats is None:
        v = x[~pad]
        stats = (v.mean(0), v.std(0).clamp(min=1e-3))
    z = (x - stats[0]) / stats[1]
    z[..., 7] = x[..., 7]
    z = z.masked_fill(pad[..., None], 0)
    return z, torch.stack([r["q"] for r in records]), torch.stack([r["named"] for r in records]), pad, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=192)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model()
    t0 = time.time()
    every = {name: capture(model, name, n) for name, n in (("train", args.train), ("val", args.val), ("test", args.test))}
    print(f"captured in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {len(v)} masks" for k, v in every.items()))
    # the training positions, by thousands: read many times by the bundled model's stages (README)
    for lo in range(0, args.train, 1000):
        recs = [r for r in every["train"] if lo <= r["conversation"] < lo + 1000]
        report(recs, [int(r["feats"][:, 6].argmax()) if len(r["area"]) else 0 for r in recs], f"train {lo}-{lo + 999}, most mass")
    for name in ("val", "test"):
        recs = every[name]
        print(name)
        report(recs, [int(r["feats"][:, 6].argmax()) if len(r["area"]) else 0 for r in recs], "most mass (bundled)")
        report(recs, [int(_iou(r).argmax()) if len(r["area"]) else 0 for r in recs], "best region (oracle)")
    train = [r for r in every["train"] if len(r["area"]) and _iou(r).max() > 0]
    x, q, named, pad, stats = _stack(train)
    labels = torch.tensor([int(_iou(r).argmax()) for r in train])
    r0 = train[0]
    widths = (GEO, r0["q"].shape[0], r0["feats"].shape[1] - GEO - r0["q"].shape[0] - r0["named"].shape[0], r0["named"].shape[0])
    scorer = Scorer(widths, args.small)
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.1 if args.small else 0.01)

    def picks(recs):
        with_regions = [r for r in recs if len(r["area"])]
        z, qq, nn_, pp, _ = _stack(with_regions, stats)
        with torch.no_grad():
            chosen = iter(scorer.eval()(z, qq, nn_, pp).argmax(1).tolist())
        scorer.train()
        return [next(chosen) if len(r["area"]) else 0 for r in recs]

    for step in range(args.steps + 1):
        b = torch.randint(len(train), (256,))
        loss = F.cross_entropy(scorer(x[b], q[b], named[b], pad[b]), labels[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
            report(every["val"], picks(every["val"]), "scorer, val")
    report(every["test"], picks(every["test"]), "scorer, test")
    report(train[:2000], picks(train[:2000]), "scorer, its own training masks (first 2,000)")


if __name__ == "__main__":
    main()
