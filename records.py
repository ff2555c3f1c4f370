"""certify.py's result files: a TSV of one row per input (Cohen et al.'s columns), the settings
record beside it (written when the file starts), the lock and the cut-row repair; tables and plots
are derived from the files (certify.py), never stored. A file holds rows of one set of facts
(MEANING, DRAW), checked on every resume; each row is checked when read. Processes append a line
per input, so an interrupted run keeps its rows; input i's noise depends on (seed, i) alone, so its
row is the same in any order, process or resume (with the same batch, on the same device type)."""

import errno
import fcntl
import hashlib
import json
import math
import os
import stat
from decimal import ROUND_FLOOR, Context, Decimal

import torch

import data

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
    strict)."""
    path = settings_path(tsv_path)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        saved = None
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
        if labels is not None and not 0 <= i < len(labels):
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
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a results file") from None
    except FileNotFoundError:
        raise ValueError(f"no results file at {path}") from None
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
        raise


def _continue(f, path, settings, indices, check, overwrite, log):
    """open_results once the file is open: the lock, what can be continued, what starts afresh."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ValueError(f"another process is writing {path}; wait, or use another --out") from None
    f.seek(0)
    text = f.read()
    if text and text.splitlines()[0] != HEADER:
        raise ValueError(
            f"{path} is not a results file of certify.py (no TSV header); choose another --out"
        )
    lines = text.splitlines(keepends=True)
    last = lines[-1] if lines and lines[-1][-1] not in "\r\n" else ""  # a line without its end
    fields = last.split("\t")
    if len(fields) == 6 and fields[5].strip():  # a whole row whose newline an editor dropped
        append_line(f.fileno(), "\n")
        text += "\n"
    elif last:  # a kill inside a write: the last line is cut short
        text = text[: -len(last)]
        f.truncate(len(text.encode()))
        log(f"warning: dropped the cut-off last row of {path}; its input will be certified again")
    saved = read_settings(path, strict=not overwrite)
    body = "".join(text.splitlines()[1:])  # the rows, whatever their line ends
    differ = lambda keys: [k for k in keys if saved.get(k) != settings[k]]
    why = None
    if body and saved is None:
        why = f"it has rows but no settings record ({settings_path(path)})"
    elif body and differ(MEANING):
        why = f"its rows were made with other settings ({', '.join(differ(MEANING))})"
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


def row_line(idx, label, predict, R, seconds):
    """A TSV row; the radius is R's exact value rounded down to 5 decimals: it never overclaims."""
    R_text = Decimal(R).quantize(Decimal("1e-5"), ROUND_FLOOR, Context(prec=400))
    return f"{idx}\t{label}\t{predict}\t{R_text}\t{int(predict == label)}\t{seconds:.3f}\n"


def append_line(fd, line):
    """One write of one line to an O_APPEND file: the rows of several processes never interleave."""
    os.write(fd, line.encode())
