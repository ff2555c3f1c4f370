"""certify.py's result files: a TSV of one row per input (Cohen et al.'s columns), the settings
record beside it (written when the file starts), the lock and the cut-row repair; then what reads
them: the table, the plot (certify.py --plot writes it as a PNG beside the file) and the paired
comparison (--compare). A file holds rows of one set of facts
(MEANING, DRAW), checked on every resume; each row is checked when read. Processes append a line
per input, so an interrupted run keeps its rows; input i's noise depends on (seed, i) alone, so its
row is the same in any order, process or resume (with the same batch, on the same device type)."""

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import stat
import time
import warnings
from decimal import ROUND_FLOOR, Context, Decimal

import numpy as np
import torch
import torch.distributed as dist

import certify
import data
import models

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
# What the rows mean: a file never mixes rows made under other values of these.
MEANING = ("checkpoint_sha256", "dataset", "test_set_sha256", "normalize", "sigma", "beta", "n0")
MEANING += ("n", "alpha", "bound", "precision")
# How the noise was drawn. Rows drawn otherwise are valid certificates too, but a file is appended
# to only under the same draw, so that each of its rows can be made again alone.
DRAW = ("seed", "noise", "batch", "noise_device")
NOISE = "per-input: a generator seeded by sha256('SEED:IDX')"


# ---------------------------------------------------------------- the settings record and the noise
def input_generator(seed, idx, device):
    """The noise stream of test input idx: a generator on `device` seeded by (seed, idx) alone."""
    digest = hashlib.sha256(f"{seed}:{idx}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def settings_path(tsv_path):
    return os.path.splitext(tsv_path)[0] + "_settings.json"


def read_settings(tsv_path, strict=True):
    """The settings record beside a results file, or None; if unreadable, ValueError (None if not
    strict). A FIFO or a folder there is unreadable: opened without blocking, never read."""
    path = settings_path(tsv_path)
    if not os.path.exists(path):
        return None
    saved = None
    with contextlib.suppress(ValueError, RecursionError):  # unreadable, not JSON, nested 10^5 deep
        saved = json.loads(data.read_regular(path, "settings record"))  # a FIFO is never read
    if isinstance(saved, dict) or not strict:
        return saved if isinstance(saved, dict) else None
    raise ValueError(
        f"{path} is not a readable settings record; delete it together with {tsv_path}, or pass "
        "--overwrite to certify afresh"
    )


# ---------------------------------------------------------------- rows
def row_check(cap=math.inf, labels=None, classes=None):
    """A function that says what is wrong with a row, or None: the radius against cap, the largest
    that the file's n and alpha allow; with the test set's labels, the label; predict against K."""

    def check(row):
        i, label, predict, R = row["idx"], row["label"], row["predict"], row["radius"]
        if i < 0 or (classes is not None and not 0 <= label < classes):
            return f"input {i} with label {label} is not a test image of {classes or 'K'} classes"
        if labels is not None and not i < len(labels):
            return f"input {i} is not in the test set of {len(labels)} images"
        if labels is not None and label != labels[i]:
            return f"label {label} is not the test set's label {labels[i]} of input {i}"
        if predict < -1 or (classes is not None and predict >= classes):
            return f"predict {predict} is neither -1 (abstain) nor a class index"
        if not (0 <= R <= cap + 1e-9 and math.isfinite(R)):
            return f"radius {R} is outside [0, {cap:.5f}], the radii that n and alpha allow"
        if predict == -1 and R != 0:
            return f"an abstention has radius {R}, not 0"
        if row["correct"] != int(predict == label):
            return f"correct is {row['correct']}, but predict is {predict} and label {label}"
        return None

    return check


def parse_rows(text, path, check):
    """The rows of a results TSV's text as dicts; ValueError naming the first bad line."""
    lines = text.splitlines()
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{path} is not a results file of certify.py (no TSV header)")
    rows, seen = [], set()
    for number, line in enumerate(lines[1:], start=2):
        try:
            i, label, pred, R, correct, t = line.split("\t")
            h, m, sec = ["0", "0", *t.split(":")][-3:]  # 12.345 here, 0:00:12.345 in Cohen's code
            row = dict(idx=int(i), label=int(label), predict=int(pred), radius=float(R))
            row.update(correct=int(correct), time=float(h) * 3600 + float(m) * 60 + float(sec))
        except ValueError:
            raise ValueError(
                f"line {number} of {path} is corrupt; delete that line to certify its input again"
            ) from None
        problem = check(row) or (f"it repeats input {row['idx']}" if row["idx"] in seen else None)
        if problem:
            raise ValueError(
                f"line {number} of {path}: {problem}; the file was changed after certify.py wrote "
                "it: delete that line to certify its input again"
            )
        seen.add(row["idx"])
        rows.append(row)
    return rows


def read_tsv(path, check=None):
    """The rows of a results TSV, checked by `check` (default: row_check(); certify.read_rows
    checks each radius against its settings record too)."""
    try:
        text = data.read_regular(path, "results file").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a results file of certify.py (not UTF-8 text)") from None
    return parse_rows(text, path, check or row_check())


# ---------------------------------------------------------------- opening, appending
def open_results(path, settings, indices, check, overwrite=False, log=print):
    """Open the results TSV `path` for appending, locked against other runs; return (file, rows
    there, indices still to certify). Rows of another MEANING are never mixed in, nor appended to
    under another DRAW: refused, unless overwrite starts afresh. A cut-off last row is dropped.
    Nothing is written to a file that is not a results file."""
    if os.path.isdir(path) or not path.endswith(".tsv"):
        raise ValueError(
            f"--out must be a file name ending in .tsv (its record's name), not {path}"
        )
    record = read_settings(path, strict=False)
    if os.path.isdir(settings_path(path)):
        raise ValueError(f"{settings_path(path)} is a folder: remove it, or choose another --out")
    if record is not None and not set(MEANING + DRAW) <= set(record):  # a JSON of someone else's
        raise ValueError(
            f"{settings_path(path)} is not a settings record of certify.py, and would be "
            "replaced: move it, or choose another --out"
        )
    made = not os.path.lexists(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Never through a symlink (O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK).
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"--out {path} is a symbolic link; give the file's own path") from None
        raise ValueError(f"cannot write {path} ({e.strerror}); choose another --out") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"--out {path} is not a regular file; choose another --out")
    f = os.fdopen(fd, "a+", encoding="utf-8", newline="")  # as on disk: a CRLF stays 2 characters
    try:
        return _continue(f, path, settings, indices, check, overwrite, log)
    except BaseException:
        f.close()
        if made and os.path.getsize(path) == 0:  # refused: the empty file this call made goes
            os.remove(path)
        raise


def _continue(f, path, settings, indices, check, overwrite, log):
    """open_results once the file is open: the lock, what can be continued, what starts afresh."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ValueError(f"another process is writing {path}; wait, or use another --out") from None
    f.seek(0)
    try:
        text = f.read()
    except UnicodeDecodeError:
        text = "not UTF-8"
    if text and text.splitlines()[0] != HEADER:
        raise ValueError(
            f"{path} is not a results file of certify.py (no TSV header); choose another --out"
        )
    saved = read_settings(path, strict=not overwrite)
    differ = lambda keys: [k for k in keys if saved.get(k) != settings[k]]
    body = "".join(text.splitlines()[1:])  # the rows, whatever their line ends
    why = None
    if body and saved is None:
        why = (
            f"it has rows but no settings record ({settings_path(path)}): another tool's file, "
            "or one whose record was lost (--overwrite would empty it)"
        )
    elif body and differ(MEANING):
        why = f"its rows were made with other settings ({', '.join(differ(MEANING))})"
    lines = text.splitlines(keepends=True)
    last = lines[-1] if lines and lines[-1][-1] not in "\r\n" else ""  # a line without its end
    fields = last.split("\t")
    # Only a file whose record says it is this run's own is repaired.
    if why is None and len(fields) == 6 and fields[5].strip():
        append_line(f.fileno(), "\n")  # a whole row whose newline an editor dropped
        text += "\n"
    elif why is None and last:  # a kill inside a write: the last line is cut short
        text = text[: -len(last)]
        f.truncate(len(text.encode()))
        log(f"warning: dropped the cut-off last row of {path}; its input will be certified again")
        body = "".join(text.splitlines()[1:])
    rows = parse_rows(text, path, check) if body and why is None else []
    todo = [i for i in indices if i not in {r["idx"] for r in rows}]
    if why is None and todo and rows and differ(DRAW):
        why = (
            f"its rows were drawn with other noise settings ({', '.join(differ(DRAW))}: "
            f"{', '.join(f'{k} {saved.get(k)}' for k in differ(DRAW))}), and new rows must be "
            "drawn the same way"
        )
    if why is not None:
        if not overwrite:
            raise ValueError(
                f"{path} cannot be continued: {why}; use another --out, or --overwrite to restart"
            )
        log(f"starting {path} afresh: {why}")
        f.truncate(0)
        text, rows, todo = "", [], list(indices)
    try:  # the record is written when the file starts, never rewritten under its rows
        if todo and (saved is None or differ(MEANING + DRAW)):
            data.atomic_write(settings_path(path), json.dumps(settings, indent=1))
        if todo and not text:
            append_line(f.fileno(), HEADER + "\n")
    except OSError as e:
        raise ValueError(
            f"could not write {path} or its settings record ({e.strerror}); make room and rerun"
        ) from None
    if rows:
        log(f"resuming {path}: {len(rows)} inputs done, {len(todo)} to go")
    return f, rows, todo


def has_rows(path):
    """Whether the results file at path holds a line beyond its header (False if there is none)."""
    try:
        return data.read_regular(path, "results file").count(b"\n", 0, 1 << 20) > 1
    except ValueError:
        return False


def row_line(idx, label, predict, R, seconds):
    """A TSV row; the radius is R's exact value rounded down to 5 decimals: it never overclaims."""
    R_text = Decimal(R).quantize(Decimal("1e-5"), ROUND_FLOOR, Context(prec=400))
    return f"{idx}\t{label}\t{predict}\t{R_text}\t{int(predict == label)}\t{seconds:.3f}\n"


def append_line(fd, line):
    """One write of one line to an O_APPEND file: the rows of several processes never interleave."""
    os.write(fd, line.encode())


# ---------------------------------------------------------------- certifying into a file
def cap_of(settings):
    """The largest radius a results file's settings record allows (inf without a record); a record
    without a valid sigma, n, alpha and bound is a ValueError."""
    if settings is None:
        return math.inf
    sigma, n, alpha, bound = (settings.get(k) for k in ("sigma", "n", "alpha", "bound"))
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    valid = number(sigma) and sigma > 0 and number(alpha) and 0 < alpha < 1
    if not (valid and isinstance(n, int) and n >= 1 and bound in certify.BOUNDS):
        raise ValueError(
            f"a settings record lacks a valid sigma, n, alpha or bound (sigma {sigma!r}, n {n!r}, "
            f"alpha {alpha!r}, bound {bound!r}): restore it, or --overwrite"
        )
    return certify.largest_radius(sigma, n, alpha, bound) or 0.0


def read_rows(path):
    """A results TSV's rows, each checked against its settings record: the radius against the
    largest that n and alpha allow, label and prediction against the dataset's classes."""
    settings = read_settings(path)
    name = (settings or {}).get("dataset")
    classes = (
        data.DATASETS[name].classes if isinstance(name, str) and name in data.DATASETS else None
    )
    return read_tsv(path, row_check(cap_of(settings), classes=classes))


CERTIFY_ARGS = ("n0", "n", "alpha", "batch", "bound")  # Smooth.certify's, from the settings


def certify_each(out, fd, smooth, dataset, indices, settings, who, log):
    """Certify dataset[i] for each i into the open file fd: a row and a log line per input."""
    t_start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for j, i in enumerate(indices):
            x, label = dataset[i]
            t0 = time.time()
            generator = input_generator(settings["seed"], i, smooth.device or x.device)
            prediction, R = smooth.certify(x, *[settings[k] for k in CERTIFY_ARGS], generator)
            dt = time.time() - t0
            try:
                append_line(fd, row_line(i, int(label), prediction, R, dt))
            except OSError as e:
                raise ValueError(
                    f"cannot write {out} ({e.strerror}); make room and rerun"
                ) from None
            remaining = (time.time() - t_start) / (j + 1) * (len(indices) - j - 1)
            note = "".join(f"  ({w.message})" for w in caught)
            caught.clear()
            log(
                f"{who}[{j + 1:>4}/{len(indices)}] idx {i:>5}  label {int(label)}  predict "
                f"{prediction:>2}  radius {R:.3f}  "
                f"{'correct' if prediction == int(label) else 'wrong  '}  {dt:.2f}s  ETA "
                f"{remaining / 60:.1f} min{note}",
                flush=True,
            )


def certify_into(out, smooth, dataset, indices, settings, overwrite, rank=0, world=1, log=print):
    """Certify dataset[i] for i in indices into `out`, process `rank` of `world` taking every
    world-th input still missing; on rank 0, return these rows' summary, with their `seconds`."""
    check = row_check(cap_of(settings), data.labels(dataset), smooth.num_classes)
    f, todo = None, None
    if rank == 0:
        try:
            f, _, todo = open_results(out, settings, indices, check, overwrite, log)
        except ValueError as e:
            todo = str(e)
    # Rank 0's verdict (the inputs to do, or why not) binds every process.
    todo = models.from_rank0(todo)
    if isinstance(todo, str):
        raise ValueError(todo)
    fd = f.fileno() if f is not None else os.open(out, os.O_WRONLY | os.O_APPEND)
    who = f"rank {rank}: " if world > 1 else ""
    try:
        certify_each(out, fd, smooth, dataset, todo[rank::world], settings, who, log)
        if world > 1:  # rank 0 holds the lock until every process has written its rows
            dist.barrier()
    finally:
        os.close(fd) if f is None else f.close()
    if rank != 0:
        return None
    wanted = set(indices)
    kept = [r for r in read_tsv(out, check) if r["idx"] in wanted]
    return dict(certify.summarize(kept), seconds=sum(r["time"] for r in kept))


# ---------------------------------------------------------------- the table, the summary, the plot
def format_table(summary, title=""):
    """The paper's Table 1 layout: certified accuracy at each radius, then ACR."""
    width = max(20, len(title) + 1)
    head = f"{'':<{width}}" + "".join(f"{r:>7.2f}" for r in summary["cert_acc"]) + f"{'ACR':>8}"
    accs = "".join(f"{a:>7.3f}" for a in summary["cert_acc"].values())
    row = f"{title:<{width}}{accs}{summary['acr']:>8.3f}"
    return f"certified accuracy at radius r, over {summary['inputs']} inputs\n{head}\n{row}"


PNG_MARK = b"certify.py --plot"  # in the PNG's Software field: a plot this tool may redraw


def check_png(png_path):
    """ValueError unless png_path is free, or a plot that certify.py --plot drew (it redraws it)."""
    if os.path.isdir(png_path):
        raise ValueError(f"--plot would write {png_path}, a folder: choose another --out")
    if os.path.lexists(png_path) and PNG_MARK not in data.read_regular(png_path, "plot"):
        raise ValueError(f"{png_path} was not drawn by certify.py --plot: move it, or drop --plot")


def plot_curve(tsv, title, png_path):
    """Figure 1 for one results file: approximate certified accuracy against radius r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(tsv)
    grid = [i / 100 for i in range(int(max([r["radius"] for r in rows] + [0.5]) * 100) + 2)]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot(grid, list(certify.summarize(rows, grid)["cert_acc"].values()))
    ax.set(title=title, xlabel="radius r (l2, pixel space)", ylabel="certified accuracy")
    ax.grid(alpha=0.3)
    check_png(png_path)
    save_png(fig, png_path, dpi=120, metadata={"Software": PNG_MARK.decode()})


def save_png(fig, png_path, dpi=110, metadata=None):
    """fig as a PNG, written atomically (a symlink there is replaced, never written through), then
    closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    data.atomic_write(png_path, lambda f: fig.savefig(f, dpi=dpi, format="png", metadata=metadata))
    plt.close(fig)


# ---------------------------------------------------------------- paired comparison
def bootstrap_means(d, resamples, rng, block=2**22):
    """(resamples,) means of d resampled with replacement, drawn in blocks of about `block` indices
    (50,000 inputs x 10,000 resamples at once would need 4 GB)."""
    out = np.empty(resamples)
    per = max(1, block // len(d))
    for s in range(0, resamples, per):
        r = min(per, resamples - s)
        picks = rng.integers(0, len(d), (r, len(d)))  # (r, m) indices
        out[s : s + r] = d[picks].mean(1)  # (r, m) -> (r,) means
    return out


COMPARED = ("sigma", "beta", "n0", "n", "alpha", "bound", "precision", "normalize")


def differences(path_a, path_b):
    """What the settings records of two results files say differently, as notes; ValueError where
    they hold other test sets, whose images cannot be paired."""
    a, b = read_settings(path_a, strict=False), read_settings(path_b, strict=False)
    if a is None or b is None:
        missing = [p for p, s in ((path_a, a), (path_b, b)) if s is None]
        return [f"no settings record beside {', '.join(missing)}: its settings are unknown"]
    for key in ("dataset", "test_set_sha256"):
        if a.get(key) != b.get(key):
            raise ValueError(f"{path_a} and {path_b} were certified on other test sets ({key})")
    differ = [key for key in COMPARED if a.get(key) != b.get(key)]
    return [f"A and B differ in {key}: {a.get(key)} against {b.get(key)}" for key in differ]


def compare(paths, resamples=10_000, seed=0):
    """Pairs (A, B) of results files, each compared on the inputs both hold: ACR of each, B - A with
    a 95% paired-bootstrap interval (inputs resampled), the certified-accuracy difference at each r.
    With several pairs (one per training seed): their mean difference with a two-level bootstrap
    interval (pairs resampled, then inputs within each), and the spread of A's and B's ACR."""
    in_pairs = [set(pair) for pair in zip(paths[::2], paths[1::2], strict=True)]
    repeated = sorted({p for p in paths if sum(p in pair for pair in in_pairs) > 1})
    if repeated:
        raise ValueError(
            f"{', '.join(repeated)} appears in more than one pair: each pair is one training "
            "seed's own two files"
        )
    rng = np.random.default_rng(seed)
    pairs, diffs = [], []
    for path_a, path_b in zip(paths[::2], paths[1::2], strict=True):
        a, b = ({r["idx"]: r for r in read_rows(p)} for p in (path_a, path_b))
        common = sorted(set(a) & set(b))
        if not common:
            raise ValueError(
                f"{path_a} and {path_b} share no inputs; compare them on the same images"
            )
        i = next((i for i in common if a[i]["label"] != b[i]["label"]), None)
        if i is not None:
            raise ValueError(
                f"{path_a} and {path_b} disagree on the label of input {i}: they were not "
                "certified on the same test set"
            )
        s_a, s_b = (certify.summarize([rows[i] for i in common]) for rows in (a, b))
        credit = [np.array([r[i]["radius"] * r[i]["correct"] for i in common]) for r in (a, b)]
        d = credit[1] - credit[0]  # (m,) per-input difference of the ACR's terms
        lo, hi = np.percentile(bootstrap_means(d, resamples, rng), [2.5, 97.5])
        diffs.append(d)
        pairs.append(
            dict(a=path_a, b=path_b, inputs=len(common), acr_a=s_a["acr"], acr_b=s_b["acr"])
        )
        pairs[-1].update(diff=float(d.mean()), ci=(float(lo), float(hi)))
        pairs[-1].update(notes=differences(path_a, path_b))
        pairs[-1]["cert_acc_diff"] = {
            r: s_b["cert_acc"][r] - s_a["cert_acc"][r] for r in certify.RADII
        }
    result = dict(pairs=pairs, seed=seed)
    if len(pairs) > 1:
        m = len(pairs)
        pick = rng.integers(0, m, (resamples, m))  # the pairs, resampled
        inner = np.stack(
            [bootstrap_means(d, resamples * m, rng).reshape(resamples, m) for d in diffs]
        )  # (m, resamples, m)
        rows, cols = np.arange(resamples)[:, None], np.arange(m)[None, :]
        two_level = inner[pick, rows, cols].mean(1)  # (resamples, m) -> (resamples,)
        lo, hi = np.percentile(two_level, [2.5, 97.5])
        result.update(diff=float(np.mean([p["diff"] for p in pairs])), ci=(float(lo), float(hi)))
        for key in ("acr_a", "acr_b"):
            v = [p[key] for p in pairs]
            result[key] = dict(mean=np.mean(v), sd=np.std(v, ddof=1), min=min(v), max=max(v))
    return result


def format_comparison(c):
    several = len(c["pairs"]) > 1
    lines = []
    for j, p in enumerate(c["pairs"], start=1):
        lines += [
            f"{f'pair {j}: ' * several}on the {p['inputs']} inputs both hold: ACR "
            f"{p['acr_a']:.3f} (A, {p['a']}), {p['acr_b']:.3f} (B, {p['b']})\n"
            f"ACR difference B - A: {p['diff']:+.3f}, "
            f"95% paired-bootstrap interval [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] (seed "
            f"{c['seed']})\ncertified accuracy difference B - A at radius r",
            "".join(f"{r:>7.2f}" for r in p["cert_acc_diff"]),
            "".join(f"{v:>+7.3f}" for v in p["cert_acc_diff"].values()),
            *(f"note: {note}" for note in p["notes"]),
        ]
    if several:
        coarse = "; with under 5 pairs the pair level is coarse" * (len(c["pairs"]) < 5)
        lines.append(
            f"over the {len(c['pairs'])} pairs: mean ACR difference B - A {c['diff']:+.3f}, 95% "
            f"two-level bootstrap interval [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] (pairs "
            f"resampled, then inputs within each{coarse})"
        )
        lines += [
            f"ACR of {side} over the pairs: mean {s['mean']:.3f}, SD {s['sd']:.3f}, range "
            f"{s['min']:.3f} to {s['max']:.3f}"
            for side, s in (("A", c["acr_a"]), ("B", c["acr_b"]))
        ]
    return "\n".join(lines)
