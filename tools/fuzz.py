#!/usr/bin/env python3
"""Fuzz planc's input surface: plans and command lines, in-process through planc.cli.main.

    python3 tools/fuzz.py --cases 1000            # summary in fuzz-out/ (fuzz.json, fuzz.md)
    python3 tools/fuzz.py --cases 200 --seed 7 --out /tmp/fz

What is thrown (hypothesis draws every choice, so a run is reproducible from --seed):

- plans: the shipped plans (plans/**/*.yaml) and the bad-plan corpus (tests/bad_plans)
  mutated three ways — as a tree (keys deleted, renamed, misspelt, added; values retyped,
  out of range, NaN/inf, huge, empty), as YAML text (lines deleted, duplicated, swapped,
  spliced in from another plan, re-indented, truncated, YAML syntax and tags inserted:
  anchors, aliases, `!!python/object`, several documents) and as bytes (bit flips, NUL
  bytes, invalid UTF-8, BOMs, UTF-16, random bytes). Each mutated plan goes through
  `planc.load_plan` (text and, when it parses, dict), `planc validate`, `planc explain
  --no-layers`, and — when its model section is still one of the small digits models, so
  a mutation cannot ask for a 10^9-wide layer — the full `planc explain` (trace, select,
  insert_masks on a real model).
- command lines: every subcommand with random flags (known and unknown, with and without
  values, `--flag=value`, repeated), values (empty, '-', NaN, 1e999, negative, huge,
  unicode, NUL-free binary-ish text) and paths (missing, a directory, an empty file, a
  binary file, a bad plan, a valid plan). Commands that would do real work on a valid
  plan (apply, compare without --dry-run, bench) only get inputs that must be refused.

- the trust model (docs/robustness.md): plans naming standard-library, builtin or
  planc-internal callables (`os:system`, `subprocess:run`, `pathlib:Path.touch`, ...) with
  kwargs that would create a marker file, through validate, explain and apply; special
  and huge plan files (/dev/zero, /dev/urandom, a FIFO, up to 40 MiB, a directory); a
  finished run folder with one file mutated (bytes, or its JSON tree) and often
  re-hashed, loaded with `planc.load(DIR, model=...)`; checkpoint headers with bit flips;
  another plan's runtime state loaded into a runtime.

Findings (each is a bug): an exception escaping `main` (anything but its return), an exit
status outside {0, 1, 2}, 'Traceback' in the output, `planc: internal error` (a non-planc
exception that only main's last-resort handler caught), a non-PlanError from
`planc.load_plan`, a case running past --timeout seconds (a hang), code a plan named
running, a refused input that was accepted, or a run-folder, checkpoint or state
mutation that gave anything but its one planc error (or an unchanged result). Reproducers (argv
and the plan bytes) are written next to the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model sections for which a full `planc explain` (which builds the model) is safe.
CHEAP_FACTORIES = ("planc.examples.digits:mlp", "planc.examples.digits:cnn")
CHEAP_MAX_WIDTH = 1024          # hidden/channels kwargs above this are not built
CHEAP_MAX_INPUT = 1 << 16       # elements in all example inputs


# ---- the corpus ---------------------------------------------------------------------
def corpus(root: str = ROOT) -> Dict[str, bytes]:
    """name -> bytes of every shipped plan and bad plan."""
    out: Dict[str, bytes] = {}
    pats = [os.path.join(root, "plans", "**", "*.yaml"), os.path.join(root, "tests", "bad_plans", "*.yaml")]
    for pat in pats:
        for path in sorted(glob.glob(pat, recursive=True)):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    if not out:
        raise SystemExit(f"fuzz: no plans found under {root}")
    return out


WEIRD_SCALARS: List[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 7, 16, 10 ** 9, -(10 ** 9), 2 ** 63, 2 ** 64 + 1, -(2 ** 70), 10 ** 30,
    0.0, -0.0, 0.5, 1.0, 1.5, 0.999999999, 1.0000001, 1e-300, 1e300, -1e300, float("nan"), float("inf"),
    float("-inf"), "", " ", "0", "nan", "1e999", "yes", "~", "null", "x" * 300, "layers.*", "*", "[", "{",
    "planc.examples.digits:mlp", "no.such.module:thing", "os:getcwd", "planc.examples.digits:nothing", ":",
    "a:b:c", "sequential_attention_pp", "acdc", "magnitude", "powerprop", "dense", "sparsify", "finetune",
    "paper", "attention", "Linear", "Conv2d", "last", "first", "\u00e9\u00e8\u2603", "\x7f", "../../etc/passwd",
    [], {}, [0], [16], [16, 16], [0, 16], [-8, 8], [8, 8, 8], [1.5, 2], ["a", "b"], [[64, 64]], [[0, 64]],
    [[-1, 64]], [[]], [[64]], {"a": 1}, {"": None}, [None], [[1, 2], [3]],
]

KEY_POOL = ["version", "name", "model", "targets", "method", "schedule", "train", "lower", "output", "factory",
            "kwargs", "example_inputs", "defaults", "rules", "match", "block", "sparsity", "min_blocks", "skip",
            "type", "position", "phases", "phase", "steps", "preset", "c", "score", "optimizer", "lr", "data",
            "backend", "budget", "curve", "every", "initial", "frontend", "input_dtype", "clip", "seed", "loss",
            "checkpoint_every", "eval_every", "warmup_steps", "lr_schedule", "momentum", "weight_decay",
            "logits_lr", "alpha", "unknown", "Version", "blocks", "spars1ty", "", "0", "$ref", "<<"]

PWNED = "/tmp/planc-fuzz-pwned"
YAML_SNIPPETS = [
    "&a [1, 2]", "*a", "*nowhere", "!!python/object/apply:os.system ['touch /tmp/planc-fuzz-pwned']",
    "!!python/name:os.system", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!custom 1", "? [a]",
    "<<: *a", "%YAML 1.1", "---", "...", "{", "}", "[", "]", ": :", "- - -", "|", ">", "'", '"', "#", "\t",
    "key: value: other", "&x a: *x", "!!int 3.5", "!!float abc", "!!str", "!!null x", "2001-12-14t21:59:43.10-05:00",
    "0x1F", "0o17", "1_000", ".inf", "-.inf", ".nan", "~", "@", "`", "%", "\u2028", "\ufeff",
]

BILLION_LAUGHS = (
    "version: 1\nname: lol\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "method: {name: acdc}\n"
).encode()

DEEP_NESTING = (b"version: 1\nname: deep\nmethod: {name: acdc}\nmodel: " + b"[" * 5000 + b"]" * 5000 + b"\n")


# ---- mutations (every random choice comes from `rnd`, a hypothesis-seeded Random) -----
def _paths(obj: Any, prefix=()) -> List[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _typo(rnd: random.Random, key: str) -> str:
    if not key:
        return "x"
    i = rnd.randrange(len(key))
    op = rnd.randrange(4)
    if op == 0:
        return key[:i] + key[i + 1:] or key + "_"
    if op == 1:
        return key[:i] + rnd.choice("abcxyz_.-0 ") + key[i:]
    if op == 2:
        return key.upper()
    return key + "s"


def _scalar(rnd: random.Random, old: Any = None) -> Any:
    v = rnd.choice(WEIRD_SCALARS)
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rnd.random() < 0.4:
        try:
            v = rnd.choice([old * 10 ** 6, -old, old + 1, old - 1, old / 3, old * 1.0000001, math.nextafter(float(old), math.inf)])
        except (OverflowError, TypeError):
            pass
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v


def mutate_tree(rnd: random.Random, doc: Any, n: int) -> Any:
    """n random edits of a parsed plan (a copy)."""
    try:
        doc = json.loads(json.dumps(doc, default=str)) if doc is not None else {}
    except (ValueError, TypeError, RecursionError):     # e.g. a recursive alias
        doc = {}
    for _ in range(n):
        paths = _paths(doc)
        path = rnd.choice(paths)
        if not path:
            if rnd.random() < 0.2:
                doc = _scalar(rnd)
            continue
        parent, last = _get(doc, path[:-1]), path[-1]
        op = rnd.randrange(8)
        if op == 0:                                    # delete
            del parent[last]
        elif op == 1 and isinstance(parent, dict):     # rename / misspell
            new = _typo(rnd, str(last)) if rnd.random() < 0.6 else rnd.choice(KEY_POOL)
            parent[new] = parent.pop(last)
        elif op == 2 and isinstance(parent, dict):     # add a key
            parent[rnd.choice(KEY_POOL)] = _scalar(rnd)
        elif op == 3:                                  # duplicate a list element / copy a subtree elsewhere
            if isinstance(parent, list):
                parent.insert(rnd.randrange(len(parent) + 1), json.loads(json.dumps(parent[last], default=str)))
            else:
                other = rnd.choice(paths)
                try:
                    parent[last] = json.loads(json.dumps(_get(doc, other), default=str))
                except (KeyError, IndexError, TypeError):
                    pass
        elif op == 4:                                  # empty container / wrap in a list
            parent[last] = rnd.choice([[], {}, [parent[last]], {"x": parent[last]}])
        else:                                          # retype / out of range
            parent[last] = _scalar(rnd, parent[last])
    return doc


def mutate_text(rnd: random.Random, text: str, donor: str, n: int) -> str:
    lines = text.splitlines(keepends=True) or ["\n"]
    donors = donor.splitlines(keepends=True) or ["\n"]
    for _ in range(n):
        i = rnd.randrange(len(lines)) if lines else 0
        op = rnd.randrange(9)
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[i])
        elif op == 2 and len(lines) > 1:
            j = rnd.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines.insert(i, rnd.choice(donors))
        elif op == 4 and lines:
            pad = rnd.choice(["", " ", "  ", "    ", "\t", "-  "])
            lines[i] = pad + lines[i].lstrip() if rnd.random() < 0.5 else pad + lines[i]
        elif op == 5 and lines:
            line = lines[i]
            k = rnd.randrange(len(line) + 1)
            lines[i] = line[:k] + rnd.choice(YAML_SNIPPETS) + line[k:]
        elif op == 6:
            lines.insert(i, rnd.choice(YAML_SNIPPETS) + "\n")
        elif op == 7 and lines:
            cut = rnd.randrange(len("".join(lines)) + 1)
            return "".join(lines)[:cut]
        elif lines:
            line = lines[i]
            if ":" in line:
                k = line.index(":")
                lines[i] = line[:k + 1] + " " + json.dumps(_scalar(rnd)) + "\n"
    return "".join(lines)


def mutate_bytes(rnd: random.Random, data: bytes, n: int) -> bytes:
    op = rnd.randrange(7)
    if op == 0:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
    if op == 1:
        return b"\xef\xbb\xbf" + data
    if op == 2:
        try:
            return data.decode("utf-8", "replace").encode(rnd.choice(["utf-16", "utf-32", "latin-1"]), "replace")
        except Exception:
            return data
    buf = bytearray(data or b"\x00")
    for _ in range(n):
        i = rnd.randrange(len(buf))
        if op == 3:
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 4:
            buf[i:i] = rnd.choice([b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x1b[2J", b"\r", b"\x85"])
        elif op == 5:
            del buf[i:i + rnd.randrange(1, 40)]
            if not buf:
                buf = bytearray(b"\x00")
        else:
            buf[i] = rnd.randrange(256)
    return bytes(buf)


# ---- running one case -----------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so `except Exception` in planc cannot eat it."""


@dataclass
class Outcome:
    kind: str                  # "plan" | "cli" | "load_plan"
    argv: List[str]
    status: Optional[int]
    seconds: float
    problem: Optional[str] = None
    output: str = ""
    source: str = ""           # which corpus plan / mutation it came from
    plan_file: Optional[str] = None


@dataclass
class Fuzzer:
    work: str                          # a scratch folder (mutated plans, --out targets)
    timeout: float = 30.0
    outcomes: List[Outcome] = field(default_factory=list)
    corpus: Dict[str, bytes] = field(default_factory=dict)
    counter: int = 0
    safety_cases: Counter = field(default_factory=Counter)     # trust-model cases by kind

    def __post_init__(self):
        self.corpus = self.corpus or corpus()
        os.makedirs(self.work, exist_ok=True)
        self.empty = self._write("empty.yaml", b"")
        self.binary = self._write("binary.yaml", bytes(range(256)))
        self.dir = os.path.join(self.work, "a-directory")
        os.makedirs(self.dir, exist_ok=True)
        self.valid = [os.path.join(ROOT, n) for n in sorted(self.corpus) if n.startswith("plans" + os.sep)]
        self.cheap_valid = [p for p in self.valid if os.path.basename(p).startswith("digits")]
        self.bad = [os.path.join(ROOT, n) for n in sorted(self.corpus) if n.startswith("tests" + os.sep)]

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.work, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _alarm(self, seconds: float):
        def handler(signum, frame):
            raise CaseTimeout()
        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        return old

    def call(self, argv: Sequence[str], *, kind: str, source: str = "", plan_file: Optional[str] = None,
             stdin: Optional[str] = None) -> Outcome:
        """planc.cli.main(argv) under a timeout, output captured; records and returns the outcome."""
        from planc.cli import main

        out, err = io.StringIO(), io.StringIO()
        status, problem = None, None
        t0 = time.perf_counter()
        old_stdin = sys.stdin
        old = self._alarm(self.timeout)
        cwd = os.getcwd()
        try:
            if stdin is not None:
                sys.stdin = io.StringIO(stdin)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(list(argv))
        except CaseTimeout:
            problem = f"hang: no result after {self.timeout:g} s"
        except SystemExit as done:
            problem = f"SystemExit({done.code!r}) escaped main"
        except BaseException as exc:  # noqa: BLE001 - that is the finding
            import traceback
            problem = f"{type(exc).__name__} escaped main: {exc}"
            err.write(traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            sys.stdin = old_stdin
            if os.getcwd() != cwd:
                os.chdir(cwd)
        text = out.getvalue() + err.getvalue()
        if problem is None:
            if not isinstance(status, int) or status not in (0, 1, 2):
                problem = f"exit status {status!r} outside {{0, 1, 2}}"
            elif "Traceback (most recent call last)" in text:
                problem = "traceback in the output"
            elif "planc: internal error" in text:
                problem = "internal error (a non-planc exception reached main)"
        o = Outcome(kind=kind, argv=list(argv), status=status, seconds=time.perf_counter() - t0,
                    problem=problem, output=text[-4000:] if problem else text[-300:], source=source,
                    plan_file=plan_file)
        self.outcomes.append(o)
        return o

    def load_plan(self, source: Any, *, label: str) -> Outcome:
        """planc.load_plan on text or a dict: only PlanError may come out."""
        from planc.errors import PlanError
        import planc

        t0 = time.perf_counter()
        problem = None
        old = self._alarm(self.timeout)
        try:
            planc.load_plan(source)
        except PlanError:
            pass
        except CaseTimeout:
            problem = f"hang: no result after {self.timeout:g} s"
        except BaseException as exc:  # noqa: BLE001
            import traceback
            problem = f"load_plan raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            label += "\n" + traceback.format_exc()[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        o = Outcome(kind="load_plan", argv=[], status=None, seconds=time.perf_counter() - t0, problem=problem,
                    output=label if problem else "", source=label.splitlines()[0])
        self.outcomes.append(o)
        return o

    # -- a mutated plan --------------------------------------------------------------
    def plan_case(self, rnd: random.Random, full_explain: bool = True) -> None:
        import yaml

        names = sorted(self.corpus)
        name = rnd.choice(names)
        data = self.corpus[name]
        how = rnd.choices(["tree", "text", "bytes", "nasty"], weights=[50, 32, 15, 3])[0]
        n = rnd.randint(1, 5)
        doc = None
        if how == "tree":
            try:
                doc = yaml.safe_load(data)
            except Exception:
                doc = {}
            doc = mutate_tree(rnd, doc, n)
            style = rnd.randrange(3)
            text = json.dumps(doc, default=str) if style == 0 else yaml.safe_dump(doc, default_flow_style=style == 1,
                                                                                 sort_keys=False, allow_unicode=True)
            payload = text.encode("utf-8", "surrogatepass")
        elif how == "text":
            donor = self.corpus[rnd.choice(names)].decode("utf-8", "replace")
            payload = mutate_text(rnd, data.decode("utf-8", "replace"), donor, n).encode("utf-8", "surrogatepass")
        elif how == "bytes":
            payload = mutate_bytes(rnd, data, n)
        else:
            payload = rnd.choice([BILLION_LAUGHS, DEEP_NESTING, data * 50, b"- " * 20000, b"a: " * 3000])
        self.counter += 1
        source = f"{name} ({how}, {n} edits)"
        path = self._write(f"case-{self.counter:05d}.yaml", payload)
        text = payload.decode("utf-8", "replace")
        self.load_plan(text, label=source)
        if doc is not None and isinstance(doc, dict) and rnd.random() < 0.3:
            self.load_plan(doc, label=source + " as dict")
        self.call(["validate", path] + rnd.choice([[], ["--json"], ["-q"]]), kind="plan", source=source, plan_file=path)
        self.call(["explain", "--no-layers", path], kind="plan", source=source, plan_file=path)
        if rnd.random() < 0.05:
            self.call(["validate", "-"], kind="plan", source=source + " on stdin", plan_file=path, stdin=text)
        if full_explain and self._cheap_model(payload):
            self.call(["explain", path] + (["--graph"] if rnd.random() < 0.2 else []), kind="plan", source=source,
                      plan_file=path)

    @staticmethod
    def _cheap_model(payload: bytes) -> bool:
        """Whether building the plan's model is cheap (digits models of modest size)."""
        import yaml

        try:
            doc = yaml.safe_load(payload)
        except Exception:
            return False
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or model.get("factory") not in CHEAP_FACTORIES:
            return False
        kwargs = model.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            return True          # refused by validation before any model is built
        for v in kwargs.values():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (-CHEAP_MAX_WIDTH <= v <= CHEAP_MAX_WIDTH):
                return False
        if kwargs.get("depth", 2) not in (1, 2, 3, 4) and isinstance(kwargs.get("depth"), int):
            return False
        total = 0
        for shape in model.get("example_inputs") or []:
            if isinstance(shape, list):
                size = 1
                for d in shape:
                    if isinstance(d, (int, float)) and not isinstance(d, bool):
                        size *= max(1, abs(int(d))) if math.isfinite(d) else CHEAP_MAX_INPUT
                total += size
        return total <= CHEAP_MAX_INPUT

    # -- a command line --------------------------------------------------------------
    FLAGS = {
        "validate": ["--format", "--json", "-q", "--quiet"],
        "explain": ["--graph", "--no-layers"],
        "schema": ["-o", "--output"],
        "apply": ["--out", "--resume", "--overwrite", "--steps", "--progress"],
        "compare": ["--sweep", "--seeds", "--out", "--steps", "--jobs", "--threads", "--force", "--eval", "--bench",
                    "--title", "--dry-run"],
        "bench": ["--full", "--backend", "--dtype", "--repeats", "--out"],
    }
    VALUES = ["", "-", "0", "-1", "1", "3", "nan", "1e999", "-5", "99999999999999999999", "text", "json", "on",
              "off", "auto", "cpu", "triton", "dense", "bf16", "float64", "x=1,2", "method.c=2,4", "train.steps=",
              "=", "a:b", "os:getcwd", "planc.examples.digits:mlp", "\u2603", "--", "-x", " ", "a" * 500]

    def paths(self, rnd: random.Random, dangerous: bool) -> str:
        pool = [self.empty, self.binary, self.dir, os.path.join(self.work, "missing.yaml"), "", "-",
                os.path.join(self.work, "no", "such", "dir", "p.yaml"), rnd.choice(self.bad), rnd.choice(self.bad)]
        if not dangerous:
            pool += self.valid + self.cheap_valid * 2
        return rnd.choice(pool)

    def cli_case(self, rnd: random.Random) -> None:
        commands = list(self.FLAGS) + ["", "nope", "--version", "-h", "VALIDATE"]
        cmd = rnd.choice(commands)
        argv: List[str] = [cmd] if cmd else []
        flags = self.FLAGS.get(cmd, []) + ["--nope", "-z", "--help", "--out=", "--steps=-3", "--", "-"]
        dangerous = cmd in ("apply", "compare", "bench")
        for _ in range(rnd.randint(0, 5)):
            r = rnd.random()
            if r < 0.45:
                argv.append(self.paths(rnd, dangerous))
            elif r < 0.8:
                f = rnd.choice(flags)
                argv.append(f)
                if rnd.random() < 0.6:
                    argv.append(self._value(rnd, f))
            else:
                argv.append(rnd.choice(self.VALUES))
        if cmd == "apply" and rnd.random() < 0.4:       # a valid plan with a number of steps that must be refused
            argv += [rnd.choice(self.cheap_valid), "--steps", rnd.choice(["0", "-1", "x", "1e3", ""])]
        if cmd == "compare" and rnd.random() < 0.5:     # dry runs do no training
            argv += [rnd.choice(self.cheap_valid), "--dry-run", "--out", os.path.join(self.work, "cmp")]
        if cmd in ("apply", "compare") and "--out" not in argv:
            argv += ["--out", os.path.join(self.work, "runs", f"r{self.counter}")]
        if self._would_train(argv):
            argv.append("--nope-refused")              # keep it a usage error: no training in the fuzzer
        if cmd == "bench" and "--help" not in argv and "-h" not in argv:
            argv += ["--backend", "none-such"]          # parser error, never a real benchmark
        self.counter += 1
        self.call(argv, kind="cli", source=f"argv ({cmd or 'none'})")

    def _value(self, rnd: random.Random, flag: str) -> str:
        if flag in ("--out", "-o", "--output"):
            return rnd.choice([os.path.join(self.work, "o", str(self.counter)), self.dir, self.binary, "",
                               os.path.join(self.binary, "under-a-file")])
        return rnd.choice(self.VALUES)

    def _would_train(self, argv: Sequence[str]) -> bool:
        """A valid plan given to apply (or to compare without --dry-run) could train for minutes."""
        if not argv or argv[0] not in ("apply", "compare"):
            return False
        if argv[0] == "compare" and "--dry-run" in argv:
            return False
        if any(a in ("-h", "--help") for a in argv):
            return False
        if argv[0] == "apply":
            # --steps with a refused value is fine; anything else with a valid plan is not
            steps_ok = False
            for i, a in enumerate(argv):
                v = argv[i + 1] if a == "--steps" and i + 1 < len(argv) else (a[8:] if a.startswith("--steps=") else None)
                if v is not None:
                    try:
                        steps_ok = int(v) <= 0
                    except ValueError:
                        steps_ok = True
            if steps_ok:
                return False
        return any(a in self.valid for a in argv)


# ---- the trust model: code a plan names, special files, run folders, checkpoints, state --
DANGEROUS_FACTORIES = ["os:system", "posix:system", "subprocess:run", "subprocess:Popen", "shutil:rmtree",
                       "runpy:run_path", "builtins:exec", "builtins:eval", "builtins:open", "io:open",
                       "pathlib:Path.touch", "importlib:import_module", "ctypes:CDLL", "pty:spawn",
                       "planc.checkpoint:atomic_write_text", "planc.train:train", "planc.safeio:create_empty"]
RUN_FILES = ("report.json", "masks.safetensors", "events.jsonl", "plan.yaml", "tensors.safetensors", "baked.json",
             "lowered.json")


class Safety:
    """Cases for the trust model (docs/robustness.md). A finding: code ran (the marker file
    appeared), a file outside the case's folder changed, an exception other than the
    expected planc error, a wrong exit status, or a hang."""

    def __init__(self, fz: "Fuzzer"):
        self.fz = fz
        self.root = os.path.join(fz.work, "safety")
        os.makedirs(self.root, exist_ok=True)
        self.marker = os.path.join(self.root, "code-ran")
        self._base: Optional[dict] = None

    def base(self) -> dict:
        """A finished run folder, an interrupted run's checkpoint and their plan: made once."""
        if self._base is None:
            import planc
            from planc.train import CHECKPOINT, train

            plan = planc.load_plan(os.path.join(ROOT, "plans", "digits-tiny.yaml"))
            plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, checkpoint_every=plan.train.steps // 2),
                                       lower=dataclasses.replace(plan.lower, backend="cpu", min_speedup=1e-6))
            # (min_speedup ~0: the folder's lowered program really calls the block-sparse op)
            done, part = os.path.join(self.root, "done"), os.path.join(self.root, "part")
            train(plan, done, progress=False, log=lambda s: None)
            train(plan, part, progress=False, log=lambda s: None, stop_after=plan.train.steps - 1)
            self._base = {"plan": plan, "done": done, "checkpoint": os.path.join(part, CHECKPOINT)}
        return self._base

    def guarded(self, what: str, fn, expected) -> None:
        """Run fn() under the timeout; anything but success or `expected` is a finding."""
        t0 = time.perf_counter()
        problem = None
        old = self.fz._alarm(self.fz.timeout)
        try:
            fn()
        except expected:
            pass
        except CaseTimeout:
            problem = f"hang: no result after {self.fz.timeout:g} s"
        except BaseException as exc:  # noqa: BLE001 - that is the finding
            problem = f"{type(exc).__name__} (expected {getattr(expected, '__name__', expected)}): " \
                      f"{' '.join(str(exc).split())[:300]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if os.path.exists(self.marker):
            problem = f"code execution: {self.marker} was created"
            os.remove(self.marker)
        self.fz.outcomes.append(Outcome(kind="safety", argv=[], status=None, seconds=time.perf_counter() - t0,
                                        problem=problem, source=f"trust: {what}"))

    def case(self, rnd: random.Random) -> None:
        # One draw from hypothesis seeds a plain generator: mutating a whole run folder takes
        # more random choices than hypothesis' buffer holds (it abandons such examples).
        local = random.Random(rnd.getrandbits(64))
        kind = local.choice(["foreign_state", "run_folder", "checkpoint", "factory", "special"])
        self.fz.safety_cases[kind] += 1
        getattr(self, kind)(local)

    def factory(self, rnd: random.Random) -> None:
        import yaml

        doc = yaml.safe_load(open(os.path.join(ROOT, "plans", "digits-tiny.yaml")))
        where = rnd.choice([("model",), ("train", "data")])
        section = doc[where[0]] if len(where) == 1 else doc[where[0]][where[1]]
        name = rnd.choice(DANGEROUS_FACTORIES)
        section["factory"] = name
        section["kwargs"] = rnd.choice([{"command": f"touch {self.marker}"}, {"path": self.marker, "text": "x"},
                                        {"self": self.marker}, {"args": ["touch", self.marker]}, {}])
        path = self.fz._write(f"safety-factory-{self.fz.counter}.yaml", yaml.safe_dump(doc).encode())
        self.fz.counter += 1
        for argv in (["validate", path], ["explain", path],
                     ["apply", path, "--out", os.path.join(self.root, f"o{self.fz.counter}"), "--progress", "off"]):
            o = self.fz.call(argv, kind="plan", source=f"trust: factory {name} at {'.'.join(where)}", plan_file=path)
            if o.problem is None and o.status != 2:
                o.problem = f"a plan naming {name} was not refused (exit {o.status})"
            if os.path.exists(self.marker):
                o.problem = f"code execution: {name} ran"
                os.remove(self.marker)

    def special(self, rnd: random.Random) -> None:
        kind = rnd.choice(["/dev/zero", "/dev/urandom", "fifo", "huge", "directory"])
        path = kind
        if kind == "fifo":
            path = os.path.join(self.root, f"fifo-{self.fz.counter}.yaml")
            os.mkfifo(path)
        elif kind == "huge":
            path = self.fz._write(f"huge-{self.fz.counter}.yaml", b"version: 1\n" + b"#" * (rnd.randint(1, 40) << 20))
        elif kind == "directory":
            path = self.fz.dir
        self.fz.counter += 1
        command = rnd.choice(["validate", "explain", "apply"])
        o = self.fz.call([command, path], kind="plan", source=f"trust: special file {kind}")
        if o.problem is None and o.status != 2:
            o.problem = f"{kind} as a plan gave exit {o.status}, expected 2"
        if kind == "huge":
            os.remove(path)

    def _copy(self) -> str:
        dst = os.path.join(self.root, f"run-{self.fz.counter}")
        self.fz.counter += 1
        shutil.copytree(self.base()["done"], dst)
        return dst

    def run_folder(self, rnd: random.Random) -> None:
        import planc
        from planc.checkpoint import load_tensors, save_tensors, sha256_file
        from planc.errors import RunFolderError
        from planc.examples.digits import mlp

        run = self._copy()
        name = rnd.choice(RUN_FILES)
        path = os.path.join(run, name)
        how = rnd.choice(["bytes", "tree"])
        if how == "tree" and name in ("report.json", "masks.safetensors", "baked.json", "lowered.json"):
            if name.endswith(".json"):
                doc = json.load(open(path))
                open(path, "w").write(json.dumps(mutate_tree(rnd, doc, rnd.randint(1, 4)), default=str))
            else:
                tensors, meta = load_tensors(path)
                save_tensors(path, tensors, mutate_tree(rnd, meta, rnd.randint(1, 4)))
        else:
            data = open(path, "rb").read()
            open(path, "wb").write(mutate_bytes(rnd, data, rnd.randint(1, 5)))
        if rnd.random() < 0.6 and name != "report.json":     # an attacker re-hashes the tampered file
            try:
                report = json.load(open(os.path.join(run, "report.json")))
                report["files"] = {f: sha256_file(os.path.join(run, f)) for f in report["files"]}
                open(os.path.join(run, "report.json"), "w").write(json.dumps(report))
            except Exception:
                pass
        model = mlp(**dict(self.base()["plan"].model.factory.kwargs_dict()))
        load = rnd.choice([lambda: planc.load(run), lambda: planc.load(run, lowered=False),
                           lambda: planc.load(run, model=model)])
        self.guarded(f"run folder: {name} mutated ({how})", load, RunFolderError)
        shutil.rmtree(run, ignore_errors=True)

    def checkpoint(self, rnd: random.Random) -> None:
        from planc.checkpoint import load_state
        from planc.errors import RunFolderError

        src = self.base()["checkpoint"]
        raw = open(src, "rb").read()
        reference = load_state(src)
        header = int.from_bytes(raw[:8], "little")
        data = bytearray(raw)
        flips = rnd.randint(1, 3)
        for _ in range(flips):
            i = 8 + rnd.randrange(header)
            data[i] ^= 1 << rnd.randrange(8)
        path = os.path.join(self.root, f"ckpt-{self.fz.counter}.safetensors")
        self.fz.counter += 1
        open(path, "wb").write(bytes(data))

        def load_and_compare():
            got = load_state(path)
            if _state_text(got) != _state_text(reference):
                raise AssertionError("a flipped header bit changed the loaded state silently")

        self.guarded(f"checkpoint header: {flips} bit flips", load_and_compare, RunFolderError)
        os.remove(path)

    def foreign_state(self, rnd: random.Random) -> None:
        import planc
        from planc.errors import RuntimeStateError
        from planc.examples.digits import mlp

        plan = self.base()["plan"]
        other = dataclasses.replace(plan, targets=dataclasses.replace(
            plan.targets, defaults=dataclasses.replace(plan.targets.defaults, sparsity=rnd.choice([0.5, 0.8, 0.95]))))
        kwargs = dict(plan.model.factory.kwargs_dict())
        theirs = planc.compile(mlp(**kwargs), other)
        mine = planc.compile(mlp(**kwargs), plan)
        state = theirs.state_dict()

        def load():
            mine.load_state_dict(state)
            raise AssertionError("a runtime state of another plan was accepted")

        self.guarded("runtime state of another plan", load, RuntimeStateError)


def _state_text(state) -> str:
    from planc.checkpoint import encode, tensors_digest

    tensors: Dict[str, Any] = {}
    return json.dumps(encode(state, tensors), sort_keys=True) + tensors_digest(tensors)


# ---- the hypothesis driver -------------------------------------------------------------
def run(cases: int, seed: int, work: str, timeout: float = 30.0, full_explain: bool = True,
        cli_share: float = 0.3, safety_share: float = 0.2) -> Fuzzer:
    """Run `cases` generated cases (each: one mutated plan through several entry points,
    or one command line)."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hseed

    fz = Fuzzer(work=work, timeout=timeout)
    safety = Safety(fz)
    os.environ.setdefault("TQDM_DISABLE", "1")

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(st.randoms(use_true_random=False))
    def one(rnd):
        # drawn from rnd, not from a second strategy: hypothesis' floats crowd at 0 and 1
        kind = rnd.choices(["cli", "safety", "plan"], weights=[cli_share, safety_share, 1 - cli_share - safety_share])[0]
        if kind == "cli":
            fz.cli_case(rnd)
        elif kind == "safety":
            safety.case(rnd)
        else:
            fz.plan_case(rnd, full_explain=full_explain)

    if os.path.exists(PWNED):
        os.remove(PWNED)
    cwd = os.getcwd()
    os.chdir(work)                     # relative outputs (runs/...) land in the scratch folder
    try:
        one()
    finally:
        os.chdir(cwd)
    if os.path.exists(PWNED):          # a `!!python/object/apply:os.system` tag was executed
        fz.outcomes.append(Outcome(kind="plan", argv=[], status=None, seconds=0.0,
                                   problem=f"code execution: {PWNED} was created by a YAML tag", source="yaml tags"))
    return fz


def summarize(fz: Fuzzer, cases: int, seed: int, seconds: float, command: str) -> dict:
    findings = [o for o in fz.outcomes if o.problem]
    by_kind = Counter(o.kind for o in fz.outcomes)
    statuses = Counter(f"{o.kind}:{o.status}" for o in fz.outcomes if o.kind not in ("load_plan", "safety"))
    known = set(Fuzzer.FLAGS)
    commands = Counter((o.argv[0] if o.argv and o.argv[0] in known else "(other or none)")
                       for o in fz.outcomes if o.kind not in ("load_plan", "safety"))
    full = sum(1 for o in fz.outcomes if o.argv[:1] == ["explain"] and "--no-layers" not in o.argv)
    slowest = max(fz.outcomes, key=lambda o: o.seconds, default=None)
    return {
        "command": command,
        "cases": cases,
        "seed": seed,
        "calls": len(fz.outcomes),
        "calls_by_kind": dict(by_kind),
        "calls_by_command": dict(commands),
        "exit_statuses": dict(sorted(statuses.items())),
        "tracebacks": sum(1 for o in findings if "traceback" in (o.problem or "") or "escaped" in (o.problem or "")),
        "internal_errors": sum(1 for o in findings if "internal error" in (o.problem or "")),
        "bad_exit_status": sum(1 for o in findings if "exit status" in (o.problem or "")),
        "load_plan_non_plan_errors": sum(1 for o in findings if o.kind == "load_plan" and "hang" not in o.problem),
        "hangs": sum(1 for o in findings if (o.problem or "").startswith("hang")),
        "safety_cases": dict(fz.safety_cases),
        "safety_findings": sum(1 for o in findings if o.kind == "safety" or o.source.startswith("trust:")),
        "findings": len(findings),
        "explains_that_built_the_model": full,
        "slowest_call_s": round(slowest.seconds, 3) if slowest else 0.0,
        "slowest_call": (slowest.argv or [slowest.source]) if slowest else None,
        "seconds": round(seconds, 1),
        "details": [asdict(o) for o in findings[:200]],
    }


def markdown(summary: dict) -> str:
    lines = [
        "# planc fuzz run", "",
        f"`{summary['command']}`", "",
        f"- cases: {summary['cases']} (seed {summary['seed']}), calls into planc: {summary['calls']} "
        f"({', '.join(f'{k} {v}' for k, v in summary['calls_by_kind'].items())})",
        f"- commands: {', '.join(f'{k} {v}' for k, v in sorted(summary['calls_by_command'].items()))}",
        f"- exit statuses: {', '.join(f'{k} {v}' for k, v in summary['exit_statuses'].items())}",
        f"- findings: {summary['findings']} — tracebacks {summary['tracebacks']}, internal errors "
        f"{summary['internal_errors']}, exit status outside {{0,1,2}} {summary['bad_exit_status']}, non-PlanError "
        f"from load_plan {summary['load_plan_non_plan_errors']}, hangs {summary['hangs']}, trust-model "
        f"{summary['safety_findings']}",
        f"- trust-model cases: {', '.join(f'{k} {v}' for k, v in sorted(summary['safety_cases'].items()))}",
        f"- explains that built and traced the model: {summary['explains_that_built_the_model']}",
        f"- wall time: {summary['seconds']} s; slowest call {summary['slowest_call_s']} s "
        f"(`{summary['slowest_call']}`)", "",
    ]
    for d in summary["details"][:50]:
        lines += [f"## {d['problem']}", "", f"- from: {d['source']}", f"- argv: `{d['argv']}`",
                  f"- plan: `{d['plan_file']}`" if d["plan_file"] else "", "", "```", d["output"][-1500:], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per call before it counts as a hang")
    ap.add_argument("--out", default="fuzz-out", help="folder for fuzz.json, fuzz.md and reproducers")
    ap.add_argument("--no-full-explain", action="store_true", help="never build models (faster)")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="planc-fuzz-")
    t0 = time.perf_counter()
    try:
        fz = run(args.cases, args.seed, work, timeout=args.timeout, full_explain=not args.no_full_explain)
        cmd = "python3 tools/fuzz.py " + " ".join(sys.argv[1:] if argv is None else list(argv))
        summary = summarize(fz, args.cases, args.seed, time.perf_counter() - t0, cmd.strip())
        repro = os.path.join(args.out, "reproducers")
        for i, o in enumerate(o for o in fz.outcomes if o.problem):
            if o.plan_file and os.path.isfile(o.plan_file):
                os.makedirs(repro, exist_ok=True)
                shutil.copy(o.plan_file, os.path.join(repro, f"{i:03d}-{os.path.basename(o.plan_file)}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "fuzz.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(args.out, "fuzz.md"), "w") as f:
        f.write(markdown(summary))
    print(f"fuzz: {summary['cases']} cases, {summary['calls']} calls, {summary['findings']} findings "
          f"({summary['tracebacks']} tracebacks, {summary['internal_errors']} internal errors, "
          f"{summary['bad_exit_status']} bad exit statuses, {summary['load_plan_non_plan_errors']} non-PlanErrors "
          f"from load_plan, {summary['hangs']} hangs, {summary['safety_findings']} trust-model) in {summary['seconds']} s; "
          f"{args.out}/fuzz.md")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
