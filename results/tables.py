"""Every table of README.md and results/README.md that comes from experiments, made from the
committed files: the results TSVs with their settings records, the checkpoints' records, and the
bench JSON files. Each table sits between `<!-- table:NAME -->` and `<!-- /table -->`.

    python results/tables.py           # rewrite the tables in both READMEs (and the figures)
    python results/tables.py --check   # exit 1 if a README's table differs from what the files give
"""

import argparse
import difflib
import glob
import hashlib
import io
import json
import math
import os
import re
import sys

import numpy as np
import torch
from scipy.stats import norm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import certify  # noqa: E402
import data  # noqa: E402
import records  # noqa: E402

E10 = os.path.join(HERE, "e10")
READMES = [os.path.join(ROOT, "README.md"), os.path.join(HERE, "README.md")]
SIGMAS = (0.25, 0.5, 1.0)
# The paper's Table 6 (MNIST, 440 epochs, n = 100,000): Cohen et al. and MACER.
PAPER_MNIST = {0.25: (0.887, 0.918), 0.5: (1.453, 1.583), 1.0: (1.417, 1.520)}
GRID = certify.RADII


# ---------------------------------------------------------------- the runs and their files
def runs():
    """Each run folder of e10/: its name, its training record (the checkpoint's config, the run's
    one record) and its results files by bound, each verified against the folder (verified)."""
    out = []
    for path in sorted(glob.glob(os.path.join(E10, "*", "checkpoint.pt"))):
        with open(path, "rb") as f:
            blob = f.read()
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        record, sha256 = ckpt["config"], hashlib.sha256(blob).hexdigest()
        off = {k: record.get(k) for k, v in E10_RECIPE.items() if record.get(k) != v}
        if ckpt["epoch"] != record.get("epochs") or off:
            sys.exit(
                f"error: {path} is not a finished run of the e10 recipe (epoch {ckpt['epoch']} of "
                f"{record.get('epochs')}; {off or 'recipe as stated'}); finish it or move it out"
            )
        tsvs = {}
        for bound in certify.BOUNDS:
            tsv = os.path.join(os.path.dirname(path), f"checkpoint_{bound}_n100000.tsv")
            if os.path.exists(tsv):
                tsvs[bound] = verified(tsv, sha256, record, bound, 100_000)
        out.append(
            dict(
                name=os.path.basename(os.path.dirname(path)),
                method=record["method"],
                sigma=record["sigma"],
                seed=record["seed"],
                k=record["k"],
                lbd=record["lbd"],
                dynamic_lbd=record["dynamic_lbd"],
                epochs=ckpt["epoch"],
                precision=record.get("precision") or "not recorded",
                machine=machine(record.get("device_name")),
                tsv=tsvs,
            )
        )
    return out


def verified(tsv, sha256, record, bound, n):
    """tsv, once its settings record says it certifies this checkpoint (its hash), at the run's
    sigma and dataset, with the bound and n its name says; else SystemExit naming what differs."""
    settings = records.read_settings(tsv) or {}
    want = dict(checkpoint_sha256=sha256, sigma=record["sigma"], dataset=record["dataset"])
    want.update(bound=bound, n=n, beta=None if bound == "clopper-pearson" else record["beta"])
    wrong = [k for k, v in want.items() if settings.get(k) != v]
    if wrong:
        got = ", ".join(f"{k} {settings.get(k)!r}" for k in wrong)
        sys.exit(f"error: {tsv}'s settings record says {got}, not its run's or its name's; fix it")
    return tsv


# What every e10 run shares (results/README.md states it); method, sigma, seed, k and lambda vary.
E10_RECIPE = dict(dataset="fashion-mnist", arch="lenet", epochs=10, lr=0.01, milestones=[5, 9])
E10_RECIPE.update(batch=64, momentum=0.9, weight_decay=5e-4, gamma=8.0, beta=16.0, grad_clip=5.0)
E10_RECIPE.update(train_subset=0, augment=False)
SAME = ("n0", "n", "alpha", "dataset", "test_set_sha256", "precision")  # in any one table


def consistent(paths, keys=SAME):
    """paths, once their settings records agree on `keys`; else SystemExit naming the setting."""
    settings = {p: records.read_settings(p) or {} for p in paths}
    for key in keys:
        values = {json.dumps(s.get(key)) for s in settings.values()}
        if len(values) > 1:
            seen = ", ".join(
                f"{os.path.relpath(p, HERE)}: {s.get(key)}" for p, s in settings.items()
            )
            sys.exit(f"error: one table would mix {key} ({seen}); certify them alike")
    return paths


def compared(paths, notes_allowed=False):
    """records.compare on pairs of files, refused where their records differ (its notes; with
    notes_allowed, in anything but the bound and its beta)."""
    c = records.compare(list(consistent(paths, SAME + ("bound",) * (not notes_allowed))))
    notes = [note for p in c["pairs"] for note in p["notes"]]
    allowed = ("A and B differ in bound", "A and B differ in beta") if notes_allowed else ()
    if any(not note.startswith(allowed) for note in notes):
        sys.exit(f"error: compared files differ: {'; '.join(notes)}")
    return c


def machine(name):
    """The CPU or GPU a record names; "not recorded" where it names only "cpu"."""
    return "not recorded" if not name or name.startswith("cpu (") else name.split(" (")[0]


def find(all_runs, method, sigma, seed=0, k=None, dynamic_lbd=False, lbd=None):
    """The run of these settings (MACER: k = 16 and lambda 16 without footnote 5, by default)."""
    k = k if k is not None else (1 if method == "cohen" else 16)
    lbd = lbd if lbd is not None else (0.0 if method == "cohen" else 16.0)
    key = (method, sigma, seed, k, dynamic_lbd, lbd)
    hits = [r for r in all_runs if (r["method"], r["sigma"], r["seed"], r["k"]) == key[:4]]
    hits = [r for r in hits if (r["dynamic_lbd"], r["lbd"]) == key[4:]]
    if len(hits) > 1:
        sys.exit(
            f"error: {', '.join(r['name'] for r in hits)} are the same run's settings; keep one"
        )
    return hits[0] if hits else None


def fmt_ci(diff, ci):
    return f"{diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def excludes_zero(ci):
    return "yes" if ci[0] > 0 or ci[1] < 0 else "no"


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


# ---------------------------------------------------------------- the tables
def e10_acr(all_runs):
    """Certified accuracy at each r and ACR, per run and bound."""
    rows = []
    order = {"clopper-pearson": 0, "bernstein": 1, "hoeffding": 2}
    consistent([p for r in all_runs for p in r["tsv"].values()])
    for r in sorted(all_runs, key=lambda r: (r["sigma"], r["k"] != 16 and r["method"] == "macer")):
        for bound, path in sorted(r["tsv"].items(), key=lambda kv: order[kv[0]]):
            s = certify.summarize(records.read_rows(path))
            what = label(r)
            what += "" if bound == "clopper-pearson" else f", Soft-RS {bound.capitalize()}"
            acc = [f"{s['cert_acc'][g]:.3f}" for g in GRID]
            trained = f"{r['precision']}, {r['machine']}"
            rows.append(
                [r["sigma"], what, r["seed"], trained, s["inputs"], *acc, f"**{s['acr']:.3f}**"]
            )
    head = ["sigma", "method", "seed", "trained in, on", "images", *[f"{g:.2f}" for g in GRID]]
    return table(head + ["ACR"], rows)


def e10_pairs(all_runs):
    """Per sigma: Cohen against MACER (k = 16) on the images both hold, every seed that has both."""
    out = {}
    for sigma in SIGMAS:
        pairs, seeds = [], []
        for seed in sorted({r["seed"] for r in all_runs}):
            a, b = find(all_runs, "cohen", sigma, seed), find(all_runs, "macer", sigma, seed)
            if a and b and "clopper-pearson" in a["tsv"] and "clopper-pearson" in b["tsv"]:
                pairs += [a["tsv"]["clopper-pearson"], b["tsv"]["clopper-pearson"]]
                seeds.append(seed)
        if pairs:
            out[sigma] = dict(compared(pairs), seeds=seeds)
    return out


def e10_compare(compared, short=False):
    rows = []
    for sigma, c in compared.items():
        seeds = len(c["pairs"])
        images = ", ".join(str(p["inputs"]) for p in c["pairs"])
        if seeds > 1:
            diff, ci = c["diff"], c["ci"]
            acr_a, acr_b = c["acr_a"]["mean"], c["acr_b"]["mean"]
        else:
            (p,) = c["pairs"]
            diff, ci, acr_a, acr_b = p["diff"], p["ci"], p["acr_a"], p["acr_b"]
        paper = "{:.3f} / {:.3f}".format(*PAPER_MNIST[sigma])
        if short:
            rows.append(
                [sigma, seeds, images, f"{acr_a:.3f}", f"{acr_b:.3f}", fmt_ci(diff, ci), paper]
            )
        else:
            each_a = ", ".join(f"{p['acr_a']:.3f}" for p in c["pairs"])
            each_b = ", ".join(f"{p['acr_b']:.3f}" for p in c["pairs"])
            how = "two-level bootstrap" if seeds > 1 else "paired bootstrap"
            rows.append(
                [
                    sigma,
                    seeds,
                    images,
                    f"{acr_a:.3f} ({each_a})" if seeds > 1 else f"{acr_a:.3f}",
                    f"{acr_b:.3f} ({each_b})" if seeds > 1 else f"{acr_b:.3f}",
                    f"{fmt_ci(diff, ci)}, {how}",
                    excludes_zero(ci),
                    paper,
                ]
            )
    if short:
        head = ["sigma", "training seeds", "images per seed", "Cohen", "MACER", "MACER - Cohen"]
        return table(head + ["paper's MNIST: Cohen / MACER"], rows)
    head = ["sigma", "seeds", "images per seed", "Cohen ACR (per seed)", "MACER ACR (per seed)"]
    head += ["MACER - Cohen, 95% interval", "excludes 0?", "paper's MNIST: Cohen / MACER"]
    return table(head, rows)


def e10_seeds(compared):
    rows = []
    for sigma, c in compared.items():
        if len(c["pairs"]) < 2:
            continue
        for seed, p in zip(c["seeds"], c["pairs"], strict=True):
            rows.append([sigma, seed, p["inputs"], f"{p['acr_a']:.3f}", f"{p['acr_b']:.3f}"])
            rows[-1] += [fmt_ci(p["diff"], p["ci"]), excludes_zero(p["ci"])]
        mean = lambda key: sum(p[key] for p in c["pairs"]) / len(c["pairs"])  # noqa: B023
        diffs = [p["diff"] for p in c["pairs"]]
        rows.append(
            [sigma, "mean of the seeds", "", f"{mean('acr_a'):.3f}", f"{mean('acr_b'):.3f}"]
        )
        rows[-1] += [f"{np.mean(diffs):+.4f} (the mean of the per-seed differences)", ""]
    head = ["sigma", "training seed", "images", "Cohen ACR", "MACER ACR", "MACER - Cohen"]
    return table(head + ["excludes 0?"], rows)


def softrs(all_runs):
    rows = []
    for r in all_runs:
        hard = r["tsv"].get("clopper-pearson")
        for bound in ("bernstein", "hoeffding"):
            if hard and bound in r["tsv"]:
                (p,) = compared([hard, r["tsv"][bound]], notes_allowed=True)["pairs"]
                soft_rows = records.read_rows(r["tsv"][bound])
                smaller = sum(
                    s["radius"] < h["radius"]
                    for s, h in zip_rows(soft_rows, records.read_rows(hard))
                )
                same = sum(
                    s["predict"] == h["predict"]
                    for s, h in zip_rows(soft_rows, records.read_rows(hard))
                )
                largest = max(s["radius"] for s in soft_rows)
                rows.append(
                    [r["name"], bound, p["inputs"], f"{p['acr_a']:.3f}", f"{p['acr_b']:.3f}"]
                )
                rows[-1] += [fmt_ci(p["diff"], p["ci"]), f"{same} of {p['inputs']}"]
                rows[-1] += [f"{smaller} of {p['inputs']}", f"{largest:.2f}"]
    head = ["run", "Soft-RS bound", "images", "Hard-RS ACR", "Soft-RS ACR", "Soft - Hard, 95%"]
    head += ["same prediction", "smaller radius", "largest Soft-RS radius"]
    return table(head, rows)


def zip_rows(a_rows, b_rows):
    b = {r["idx"]: r for r in b_rows}
    return [(r, b[r["idx"]]) for r in a_rows if r["idx"] in b]


def at_cap(all_runs):
    """Where the radii stand: the share of images certified at the largest radius that n and alpha
    allow, the share wrong or abstained (radius 0), and the quartiles of the certified p_A lower
    bound, Phi(R / sigma) on the correct, certified rows."""
    rows = []
    consistent([r["tsv"]["clopper-pearson"] for r in all_runs if "clopper-pearson" in r["tsv"]])
    for r in sorted(all_runs, key=lambda r: (r["sigma"], r["method"], r["k"], r["seed"])):
        path = r["tsv"].get("clopper-pearson")
        if not path:
            continue
        settings = records.read_settings(path)
        cap = certify.largest_radius(
            r["sigma"], settings["n"], settings["alpha"], settings["bound"]
        )
        got = records.read_rows(path)
        at = sum(x["correct"] and x["radius"] >= cap - 1e-5 for x in got)
        zero = sum(not x["correct"] or x["predict"] == -1 for x in got)
        p_low = [
            norm.cdf(x["radius"] / r["sigma"]) for x in got if x["correct"] and x["radius"] > 0
        ]
        q = np.percentile(p_low, [25, 50, 75]) if p_low else [np.nan] * 3
        what = label(r)
        rows.append([r["sigma"], what, r["seed"], len(got), f"{cap:.3f}", f"{at / len(got):.3f}"])
        rows[-1] += [f"{zero / len(got):.3f}", " / ".join(f"{v:.4f}" for v in q)]
    head = ["sigma", "method", "seed", "images", "largest radius", "share at it"]
    return table(head + ["share wrong or abstained", "p_A_low quartiles (certified)"], rows)


def label(r):
    """A run's method as the tables name it: MACER's k and lambda where they are not the e10
    recipe's (k = 16, lambda = 16 from the start)."""
    if r["method"] == "cohen":
        return "Cohen"
    what = "MACER" + (f", k = {r['k']}" if r["k"] != 16 else "")
    if r["dynamic_lbd"]:
        what += f", lambda 0 then {r['lbd']:g} (footnote 5)"
    elif r["lbd"] != 16:
        what += f", lambda {r['lbd']:g}"
    return what


def sigma1_remedy(all_runs, short=False):
    """At sigma 1.0: Cohen et al., MACER with lambda 16 throughout, and MACER with footnote 5's
    lambda = 0 until the first lr decay, then 16 or 6; each MACER run against Cohen on the images
    both hold, with clean accuracy (certified accuracy at r = 0) and the share at radius 0. short:
    each MACER run against Cohen alone, on the images both hold, for README.md."""
    cohen, plain = find(all_runs, "cohen", 1.0), find(all_runs, "macer", 1.0)
    runs = [cohen, plain] + sigma1_footnote5(all_runs)
    rows, short_rows = [], []
    for r in (r for r in runs if r and "clopper-pearson" in r["tsv"]):
        got = records.read_rows(r["tsv"]["clopper-pearson"])
        s = certify.summarize(got)
        zero = sum(not x["correct"] or x["predict"] == -1 for x in got) / len(got)
        against = []  # Cohen's ACR on the same images and the difference; then against plain
        for base in (cohen, plain):
            if r is cohen or (base is plain and r is plain):
                against += ["-", "-"]
                continue
            (p,) = compared([base["tsv"]["clopper-pearson"], r["tsv"]["clopper-pearson"]])["pairs"]
            against += [f"{p['acr_a']:.3f}", fmt_ci(p["diff"], p["ci"])]
            if base is cohen:
                name = label(r) + ", lambda 16 throughout" * (r is plain)
                acrs = [f"{p['acr_a']:.3f}", f"**{p['acr_b']:.3f}**"]
                short_rows.append([name, p["inputs"], *acrs, fmt_ci(p["diff"], p["ci"])])
        rows.append([label(r), r["name"], f"{r['precision']}, {r['machine']}", s["inputs"]])
        rows[-1] += [f"{s['cert_acc'][0.0]:.3f}", f"{zero:.3f}", f"**{s['acr']:.3f}**", *against]
    if short:
        head = ["run", "images both hold", "Cohen's ACR on them", "the run's ACR on them"]
        return table(head + ["run - Cohen, 95%"], short_rows)
    head = ["method", "run", "trained in, on", "images", "clean accuracy", "share at radius 0"]
    head += ["ACR", "Cohen's ACR on them", "- Cohen, 95%"]
    return table(head + ["lambda-16 MACER's ACR on them", "- lambda-16 MACER, 95%"], rows)


def sigma1_footnote5(all_runs):
    """The footnote-5 runs at sigma 1.0 (lambda 0 until the first decay, then 16, then 6) that
    have a Hard-RS results file."""
    runs = [find(all_runs, "macer", 1.0, dynamic_lbd=True, lbd=lbd) for lbd in (16.0, 6.0)]
    return [r for r in runs if r and "clopper-pearson" in r["tsv"]]


def sigma1_lambdas(all_runs):
    """The two footnote-5 runs against each other (lambda 16 after the deferral - lambda 6)."""
    runs = sigma1_footnote5(all_runs)
    head = ["images", "lambda 0 then 6", "lambda 0 then 16", "difference, 95%", "excludes 0?"]
    if len(runs) < 2:
        return table(head, [["not certified yet", "", "", "", ""]])
    (p,) = compared([runs[1]["tsv"]["clopper-pearson"], runs[0]["tsv"]["clopper-pearson"]])["pairs"]
    row = [p["inputs"], f"{p['acr_a']:.3f}", f"{p['acr_b']:.3f}", fmt_ci(p["diff"], p["ci"])]
    return table(head, [row + [excludes_zero(p["ci"])]])


def k_ablation(all_runs):
    """MACER at sigma 0.25, seed 0, with k copies: each run's ACR and k = 16's on the same images,
    their paired difference, and each run's certified accuracy."""
    base = find(all_runs, "macer", 0.25, 0, 16)
    rows = []
    for k in (1, 2, 4, 8, 16):
        r = find(all_runs, "macer", 0.25, 0, k)
        if not (r and "clopper-pearson" in r["tsv"]):
            rows.append([k, "not certified yet"] + [""] * 6)
            continue
        s = certify.summarize(records.read_rows(r["tsv"]["clopper-pearson"]))
        acc = " / ".join(f"{s['cert_acc'][g]:.3f}" for g in (0.0, 0.25, 0.5, 0.75))
        if k == 16:
            row = [k, s["inputs"], f"{s['acr']:.3f}", f"{s['acr']:.3f}", "-"]
        else:
            pair = [base["tsv"]["clopper-pearson"], r["tsv"]["clopper-pearson"]]
            (p,) = compared(pair)["pairs"]
            row = [
                k,
                p["inputs"],
                f"{p['acr_b']:.3f}",
                f"{p['acr_a']:.3f}",
                fmt_ci(p["diff"], p["ci"]),
            ]
        rows.append(row + [acc, r["precision"], r["machine"]])
    head = ["k", "images", "ACR", "k = 16's ACR on them", "k - (k = 16), 95%"]
    head += ["certified accuracy at 0 / 0.25 / 0.5 / 0.75", "trained in", "on"]
    return table(head, rows)


def speed(short=False):
    """The rows of the bench JSON files that the current bench.py makes (bench.ROWS, by number):
    older files also hold rows that it no longer makes, whose figures it could not reproduce."""
    files = sorted(glob.glob(os.path.join(HERE, "bench_*.json")))
    benches = []
    for path in files:
        with open(path) as f:
            benches.append((os.path.basename(path), json.load(f)))
    names = {row["name"] for _, b in benches for row in b["rows"]}
    names = sorted((n for n in names if n.split(".")[0] in bench.ROWS), key=row_order)
    head = ["measurement"]
    for file, b in benches:
        compiled = " (--compile)" * bool(b.get("compile"))
        head += [f"{b['device']}, {file}{compiled}: A / B", "ratio"]
    rows = []
    for name in names:
        if short and not name.startswith(("2.", "3d.", "3e.", "6a.")):
            continue
        line = [name]
        for _, b in benches:
            hit = [r for r in b["rows"] if r["name"] == name]
            if hit:
                r = hit[0]
                checked_row(r, file)
                ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
                line += [f"{number(r['a'])} / {number(r['b'])} {r['unit']}", ratio]
            else:
                line += ["-", "-"]
        rows.append(line)
    return table(head, rows)


def checked_row(r, file):
    """A bench row whose figures are positive and finite (or absent), its ratio a / b."""
    a, b, ratio = r["a"], r["b"], r["ratio"]
    figures = [v for v in (a, b, ratio) if v is not None]
    fine = all(isinstance(v, (int, float)) and 0 < v < math.inf for v in figures)
    if not fine or (ratio is not None and not math.isclose(ratio, a / b, rel_tol=1e-9)):
        sys.exit(f"error: {file}'s row {r['name']!r} holds a figure that bench.py cannot make")


def row_order(name):
    m = re.match(r"(\d+)([a-z]?)", name)
    return (int(m.group(1)), m.group(2), name) if m else (99, "", name)


def number(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def sizes():
    """Lines of each file as formatted (ruff format, 100 columns), and of the reading path:
    macer.py and certify.py down to their helpers, train.py's train_one_epoch and epoch_lambda."""

    def lines(name):
        with open(os.path.join(ROOT, name)) as f:
            return f.read().split("\n")

    def span(name, start, end):
        text = lines(name)
        a = next(i for i, line in enumerate(text) if line.startswith(start)) if start else 0
        b = next(i for i, line in enumerate(text) if line.startswith(end))
        return b - a

    files = ["macer.py", "train.py", "certify.py", "records.py", "data.py", "models.py", "bench.py"]
    files += ["results/tables.py", "results/toy.py"]
    code = {name: len(lines(name)) - 1 for name in files}
    helpers = "# ---------------------------------------------------------------- "
    path = {
        "macer.py": span("macer.py", None, helpers + "numerical care"),
        "train.py": span("train.py", "def train_one_epoch", "class Progress"),
        "certify.py": span("certify.py", None, helpers + "Smooth's checks"),
    }
    rows = [[name, code[name], path.get(name, "")] for name in files]
    rows.append(["all but the tests", sum(code.values()), sum(path.values())])
    return table(["file", "lines", "of which on the reading path"], rows)


def toy():
    """The worked example's figures: results/toy.json, written by results/toy.py beside toy.png."""
    with open(os.path.join(HERE, "toy.json")) as f:
        facts = json.load(f)
    rows = []
    for name, m in facts["methods"].items():
        accuracies = [m[f"certified_accuracy_{r}"] for r in ("0", "025", "05")]
        if not (all(0 <= v <= 1 for v in accuracies) and 0 <= m["acr"] < math.inf):
            sys.exit(
                f"error: results/toy.json holds figures that results/toy.py cannot make ({name})"
            )
        rows.append([name, m["k"], m["lbd"], *[f"{v:.3f}" for v in accuracies]])
        rows[-1] += [f"**{m['acr']:.3f}**"]
    head = ["two moons, sigma 0.25", "k", "lambda", "certified accuracy at r = 0", "0.25", "0.5"]
    head += [f"ACR ({facts['test_points']} test points)"]
    return table(head, rows)


def quick_run():
    """The quick run's record: results/quick/ (python train.py --out-dir results/quick)."""
    folder = os.path.join(HERE, "quick")
    ckpt = torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)
    tsv = os.path.join(folder, "certify.tsv")
    with open(os.path.join(folder, "checkpoint.pt"), "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    settings = records.read_settings(tsv)
    verified(tsv, sha256, ckpt["config"], "clopper-pearson", settings["n"])
    got = records.read_rows(tsv)
    s = certify.summarize(got)
    with open(os.path.join(folder, "log.txt")) as f:
        log = f.read()
    if f"trained in {ckpt['train_seconds']:.0f}s; checkpoint" not in log:
        sys.exit("error: results/quick/log.txt is not the log of its checkpoint's run; rerun it")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log)
    acc = " / ".join(f"{s['cert_acc'][g]:.3f}" for g in (0.0, 0.25, 0.5))
    row = [machine(ckpt["config"].get("device_name")), ckpt["config"]["precision"]]
    row += [settings["precision"], f"{ckpt['train_seconds']:.0f} s"]
    row += [f"{sum(r['time'] for r in got):.0f} s", wall.group(1) if wall else "not recorded"]
    row += [s["inputs"], settings["n"], f"{s['acr']:.3f}", acc]
    head = ["machine", "trained in", "certified in", "training", "certification", "wall"]
    return table(head + ["images", "n", "ACR", "certified accuracy at 0 / 0.25 / 0.5"], [row])


# ---------------------------------------------------------------- the figures
def figures(all_runs):
    """e10/summary.png: certified accuracy against radius, one panel per sigma, one colour per
    method, one line style per training seed; e10/radius_cdf.png: the empirical CDF of the
    certified radius (0 for wrong or abstained), the same layout; e10/k_ablation.png: MACER's
    certified accuracy at sigma 0.25 for each k, and e10/sigma1_remedy.png: Cohen's and the three
    MACER runs' at sigma 1.0, each on the images that every file in it holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {"cohen": "tab:blue", "macer": "tab:red"}
    style = ["-", "--", ":", "-."]
    compared = [r for r in all_runs if label(r) in ("Cohen", "MACER")]  # the e10 recipe's pairs
    for png, cdf in (("summary.png", False), ("radius_cdf.png", True)):
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), squeeze=False)
        for ax, sigma in zip(axes[0], SIGMAS, strict=True):
            for r in (r for r in compared if r["sigma"] == sigma and "clopper-pearson" in r["tsv"]):
                got = records.read_rows(r["tsv"]["clopper-pearson"])
                R = np.array([x["radius"] * x["correct"] for x in got])  # 0: wrong or abstained
                grid = np.linspace(0, R.max() + 0.05, 400)
                if cdf:
                    y = (R[None, :] <= grid[:, None]).mean(1)
                else:
                    y = list(certify.summarize(got, grid)["cert_acc"].values())
                legend = f"{r['method']} seed {r['seed']} ({len(got)} images)"
                ax.plot(
                    grid, y, color=colour[r["method"]], linestyle=style[r["seed"] % 4], label=legend
                )
            ax.set(title=f"sigma = {sigma}", xlabel="radius r")
            ax.set_ylabel("share of images with radius <= r" if cdf else "certified accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        records.save_png(fig, os.path.join(E10, png))
    k_curves = [
        (find(all_runs, "macer", 0.25, 0, k), f"k = {k}", plt.cm.viridis(0.85 * np.log2(k) / 4))
        for k in (1, 2, 4, 8, 16)
    ]
    curves(plt, k_curves, "MACER, sigma = 0.25, seed 0", os.path.join(E10, "k_ablation.png"))
    s1_curves = [(find(all_runs, "cohen", 1.0), "Cohen", "tab:blue")]
    s1_curves += [(find(all_runs, "macer", 1.0), "MACER, lambda 16 throughout", "tab:red")]
    for lbd, colour in ((16.0, "tab:orange"), (6.0, "tab:purple")):
        r = find(all_runs, "macer", 1.0, dynamic_lbd=True, lbd=lbd)
        s1_curves.append((r, f"MACER, lambda 0 then {lbd:g} (footnote 5)", colour))
    curves(plt, s1_curves, "sigma = 1.0, seed 0", os.path.join(E10, "sigma1_remedy.png"))


def curves(plt, chosen, title, png):
    """One panel: the certified accuracy against radius of each (run, label, colour) in chosen
    whose Hard-RS file exists, on the images all of those files hold."""
    chosen = [(r, name, c) for r, name, c in chosen if r and "clopper-pearson" in r["tsv"]]
    rows = [records.read_rows(r["tsv"]["clopper-pearson"]) for r, _, _ in chosen]
    common = set.intersection(*({x["idx"] for x in got} for got in rows))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for got, (_, name, colour) in zip(rows, chosen, strict=True):
        got = [x for x in got if x["idx"] in common]
        grid = np.linspace(0, max(x["radius"] for x in got) + 0.05, 400)
        y = list(certify.summarize(got, grid)["cert_acc"].values())
        ax.plot(grid, y, color=colour, label=name)
    ax.set(title=f"{title}: {len(common)} test images", xlabel="radius r")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    records.save_png(fig, png)


# ---------------------------------------------------------------- the READMEs
def all_tables():
    all_runs = runs()
    compared = e10_pairs(all_runs)
    return {
        "readme-e10": e10_compare(compared, short=True),
        "readme-sigma1": sigma1_remedy(all_runs, short=True),
        "readme-speed": speed(short=True),
        "sizes": sizes(),
        "quick-run": quick_run(),
        "toy": toy(),
        "e10-acr": e10_acr(all_runs),
        "e10-compare": e10_compare(compared),
        "e10-seeds": e10_seeds(compared),
        "softrs": softrs(all_runs),
        "at-cap": at_cap(all_runs),
        "k-ablation": k_ablation(all_runs),
        "sigma1-remedy": sigma1_remedy(all_runs),
        "sigma1-lambdas": sigma1_lambdas(all_runs),
        "speed": speed(),
    }, all_runs


def fill(text, tables):
    """text with each marked table replaced by its current version; SystemExit where the markers
    do not pair up (a table's end lost), before anything is replaced."""
    marks = re.findall(r"<!-- (table:[\w-]+|/table) -->", text)
    if marks[0::2] != [m for m in marks if m != "/table"] or set(marks[1::2]) - {"/table"}:
        sys.exit("error: a README's <!-- table:NAME --> and <!-- /table --> markers do not pair up")
    if len(marks) % 2:
        sys.exit("error: a README's last table has no <!-- /table --> marker")

    def one(m):
        name = m.group(1)
        if name not in tables:
            raise SystemExit(f"error: no table named {name} (tables.py knows {', '.join(tables)})")
        return f"<!-- table:{name} -->\n{tables[name]}\n<!-- /table -->"

    return re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", one, text, flags=re.S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare, write nothing")
    a = p.parse_args(argv)
    try:
        write(a.check)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, RuntimeError, OSError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}; a committed file is missing or does not fit")


def write(check):
    tables, all_runs = all_tables()
    if not check:
        figures(all_runs)  # first: if a file breaks them, no README has changed yet
    stale = []
    for path in READMES:
        with open(path) as f:
            old = f.read()
        new = fill(old, tables)
        if new != old:
            stale.append(path)
            if check:
                diff = difflib.unified_diff(
                    old.splitlines(), new.splitlines(), path, "from the files"
                )
                print("\n".join(list(diff)[:40]))
            else:
                data.atomic_write(path, new)
    if check:
        if stale:
            sys.exit(
                f"error: tables differ from the files in {', '.join(stale)}; run results/tables.py"
            )
        print("every table matches the committed files")
        return
    print(f"wrote {len(stale)} README(s) and the four figures of e10/")


if __name__ == "__main__":
    main()
