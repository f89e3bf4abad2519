"""Bad input and faults, through the real CLI: one row per case.

Each row names the run it starts from, what is done to it first (a damaged file, a foreign
directory), the command, and the words its message must hold. For every row the test asserts
exit 2 (or the row's code), those words, no traceback, and that every file of the run directory
(logs aside) is byte for byte what it was: a rejected command changes nothing. Adding a case is
adding a row. Kills (SIGKILL, Ctrl-C) are below the table: they must leave a run that the same
command resumes.

The table runs the CLI in process (typer's runner: the same `app`, the same error handling, no
interpreter start per row); the kills run real subprocesses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO, kill_at_checkpoint, nucleus


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLOSED = _closed_port()


# ---------------------------------------------------------------------- damage to do first


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return damage


def overwrite(rel: str, data: bytes) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    return damage


def first_adapter(run: Path) -> str:
    return sorted(p.name for p in (run / "adapters").iterdir() if p.name.startswith("topic-"))[0]


def adapter_file(name: str, data: bytes | None = None) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / "adapters" / first_adapter(run) / name
        path.write_bytes(data if data is not None else path.read_bytes()[: path.stat().st_size // 2])
    return damage


def foreign_files(run: Path) -> None:
    """A user's project directory: not a run, and none of it may be touched."""
    (run / "proj").mkdir(parents=True)
    (run / "proj" / ".tmp-notes.txt").write_text("my notes")
    (run / "README").write_text("mine")


def bad_checkpoint(run: Path) -> None:
    latest = run / "checkpoints" / first_other_topic(run) / "latest"  # the training `-n {other}` resumes
    latest.mkdir(parents=True)
    (latest / "state.json").write_text('{"step": 1')


def first_other_topic(run: Path) -> str:
    nucleus_topics = json.loads((run / "neighborhoods" / "nucleus.json").read_text())["topics"]
    return f"topic-{next(t for t in range(6) if t not in nucleus_topics)}"


@dataclass
class Case:
    id: str
    args: list[str]  # {run} the run directory, {tmp} a scratch folder, {adapter}/{other} ids, {closed} a port
    needles: tuple[str, ...]
    start: str = "trained"  # new | foreign | indexed | trained | adapters
    setup: Callable[[Path], None] | None = None
    inputs: dict[str, str | bytes] = field(default_factory=dict)  # files made in {tmp}
    code: int = 2


R = ["--run-dir", "{run}"]
CASES = [
    # --- the run directory itself
    Case("foreign-dir-is-refused-untouched", ["index", *R, "--set", "corpus.paths=[{tmp}/missing.txt]"],
         ("not empty and is not a Nucleus run", "proj"), start="foreign", setup=foreign_files),
    Case("foreign-dir-valid-config-too", ["run", *R], ("not a Nucleus run",), start="foreign", setup=foreign_files),
    Case("run-dir-is-a-file", ["index", "--run-dir", "{tmp}/afile"], ("is not a directory",), start="new",
         inputs={"afile": "x"}),
    Case("run-dir-below-a-file", ["index", "--run-dir", "{tmp}/afile/run"], ("afile", "Not a directory"),
         start="new", inputs={"afile": "x"}),
    Case("run-dir-on-read-only-fs", ["index", "--run-dir", "/proc/nucleus-run"], ("/proc/nucleus-run",), start="new"),
    Case("retrieve-on-no-run", ["retrieve", "--run-dir", "{tmp}/none", "x"], ("not a Nucleus run directory",),
         start="new"),
    Case("jobs-on-no-run", ["jobs", "--run-dir", "{tmp}/none"], ("not a Nucleus run directory",), start="new"),
    Case("worker-on-no-run", ["worker", "--run-dir", "{tmp}/none"], ("not a Nucleus run directory",), start="new"),
    Case("adapters-on-no-run", ["adapters", "list", "--run-dir", "{tmp}/none"], ("not a Nucleus run directory",),
         start="new"),
    # --- config: nothing is stored before every check passed
    Case("unknown-key", ["train", *R, "--set", "lora.rnak=4"], ("`lora.rnak`", "Did you mean 'rank'")),
    Case("wrong-type", ["index", *R, "--set", "graph.k=many"], ("`graph.k`", "'many'")),
    Case("out-of-range", ["explore", *R, "--set", "explore.rounds=-1"], ("`explore.rounds`",)),
    Case("group-by-not-a-choice", ["index", *R, "--set", "topics.group_by=entity"], ("`topics.group_by`", "'entity'")),
    Case("compile-not-a-choice", ["train", *R, "--set", "train.compile=sometimes"], ("`train.compile`", "'sometimes'")),
    Case("loss-not-a-choice", ["train", *R, "--set", "train.loss=fused"], ("`train.loss`", "'fused'")),
    Case("attention-not-a-choice", ["train", *R, "--set", "train.attention=flash3"], ("`train.attention`", "'flash3'")),
    # an invalid combination of modules: each key valid alone, a chosen module's need unmet
    Case("chunked-loss-needs-plain-logits", ["train", *R, "--set", "model.base={tmp}/hf", "--set", "train.loss=chunked"],
         ("invalid combination of modules", "`train.loss`", "'chunked' needs `plain_logits`", "model.base=scratch"),
         inputs={"hf/config.json": '{"model_type": "gemma2"}'}),
    Case("relora-on-a-quantised-base", ["train", *R, "--force", "--set", "model.base={tmp}/hf", "--set",
                                        "train.relora_every=5"],
         ("train.relora_every", "quantised", "bitsandbytes", "unquantised"),
         inputs={"hf/config.json": '{"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}'}),
    Case("unknown-module", ["modules", "show", "comunity"], ("unknown module 'comunity'", "Did you mean 'community'"),
         start="new"),
    # nucleus sweep's options
    Case("sweep-storage-not-postgresql", ["sweep", *R, "--set", "sweep.storage=sqlite:///x.db"],
         ("`sweep.storage`", "postgresql://", "'sqlite:///x.db'")),
    Case("sweep-report-without-a-sweep", ["sweep", "report", *R], ("sweep report", "no study", "nucleus sweep")),
    Case("sweep-space-empty", ["sweep", *R, "--set", "sweep.space=[]"], ("`sweep.space`", "empty")),
    Case("sweep-space-unknown-kind", ["sweep", *R, "--set", "sweep.space=[samplr]"],
         ("`sweep.space`", "Did you mean 'sampler'")),
    Case("sweep-space-twice", ["sweep", *R, "--set", "sweep.space=[sampler,sampler]"],
         ("`sweep.space`", "twice")),
    Case("sweep-trials-zero", ["sweep", *R, "--set", "sweep.trials=0"], ("`sweep.trials`", "0")),
    Case("sweep-steps-zero", ["sweep", *R, "--set", "sweep.steps=0"], ("`sweep.steps`", "0")),
    Case("sweep-heartbeat-zero", ["sweep", *R, "--set", "sweep.heartbeat_s=0"], ("`sweep.heartbeat_s`", "0")),
    Case("sweep-max-retry-negative", ["sweep", *R, "--set", "sweep.max_retry=-1"], ("`sweep.max_retry`", "-1")),
    Case("sweep-sampler-unknown", ["sweep", *R, "--set", "sweep.sampler=bayes"], ("`sweep.sampler`", "'bayes'", "ace")),
    Case("sweep-startup-zero", ["sweep", *R, "--set", "sweep.startup_trials=0"], ("`sweep.startup_trials`", "0")),
    Case("sweep-kappa-negative", ["sweep", *R, "--set", "sweep.ace_kappa=-1"], ("`sweep.ace_kappa`", "-1")),
    Case("sweep-study-empty", ["sweep", *R, "--set", "sweep.study=''"], ("`sweep.study`",)),
    Case("sweep-unknown-action", ["sweep", "tune", *R], ("unknown action 'tune'", "run or report")),
    Case("sweep-storage-unreachable", ["sweep", *R, "--set", "sweep.storage=postgresql://postgres@127.0.0.1:1/none"],
         ("sweep.storage", "cannot open", "127.0.0.1:1/none")),
    Case("validation-fraction-out-of-range", ["index", *R, "--set", "split.validation_fraction=0.7"],
         ("`split.validation_fraction`", "0.7")),
    Case("relora-every-above-steps", ["train", *R, "--force", "--set", "train.relora_every=100000"],
         ("train.relora_every", "train.nucleus_steps")),
    Case("relora-warm-start-above-steps", ["train", *R, "--force", "--set", "train.relora_every=10", "--set",
                                           "train.relora_warm_start=100000"],
         ("train.relora_warm_start", "train.nucleus_steps")),
    Case("relora-warm-start-negative", ["train", *R, "--set", "train.relora_warm_start=-1"],
         ("`train.relora_warm_start`", "-1")),
    Case("relora-rank-zero", ["train", *R, "--set", "train.relora_rank=0"], ("`train.relora_rank`", "0")),
    Case("relora-warmup-zero", ["train", *R, "--set", "train.relora_warmup=0"], ("`train.relora_warmup`", "0")),
    Case("relora-prune-one", ["train", *R, "--set", "train.relora_prune=1.0"], ("`train.relora_prune`", "1.0")),
    Case("sampler-typo", ["train", *R, "--set", "train.sampler=skilit"], ("train.sampler", "Did you mean 'skillit'")),
    Case("micro-batch-zero", ["train", *R, "--set", "train.micro_batch_size=0"], ("`train.micro_batch_size`", "0")),
    Case("micro-batch-not-a-divisor", ["train", *R, "--set", "train.batch_size=8", "--set", "train.micro_batch_size=3"],
         ("micro_batch_size: 3 does not divide the 8 blocks", "1, 2, 4, 8, or auto")),
    # the manifold sampler's section
    Case("manifold-space-unknown", ["train", *R, "--set", "manifold.space=hyperbolic"],
         ("`manifold.space`", "'hyperbolic'", "activation")),
    Case("manifold-traversal-unknown", ["train", *R, "--set", "manifold.traversal=random"],
         ("`manifold.traversal`", "'random'", "bandit")),
    Case("manifold-layers-empty", ["train", *R, "--set", "manifold.layers=[]"], ("`manifold.layers`", "at least one")),
    Case("manifold-layers-twice", ["train", *R, "--set", "manifold.layers=[1,1]"], ("`manifold.layers`", "twice")),
    Case("manifold-layers-with-bandit", ["train", *R, "--set", "manifold.layers=[1,2]", "--set",
                                         "manifold.traversal=bandit"], ("`manifold`", "several layers", "'bandit'")),
    Case("manifold-random-space-with-bandit", ["train", *R, "--set", "manifold.space=random", "--set",
                                               "manifold.traversal=bandit"], ("`manifold`", "space: random", "'bandit'")),
    # known only from the model's architecture (the default has 2 layers), before anything is written
    Case("manifold-layers-beyond-the-model", ["run", *R, "--set", "train.sampler=manifold", "--set",
                                              "manifold.layers=[1,2,3,4]"], ("manifold.layers", "[3, 4]", "2 layers"),
         start="indexed"),
    Case("manifold-layers-with-grow", ["train", *R, "--set", "manifold.layers=[1,2]", "--set",
                                       "manifold.traversal=grow"], ("`manifold`", "several layers", "'grow'")),
    *[Case(f"manifold-{key.replace('_', '-')}-{value}", ["train", *R, "--set", f"manifold.{key}={value}"],
           (f"`manifold.{key}`", value))
      for key, value in (("clusters", "1"), ("k", "0"), ("community_k", "-1"), ("rebuild_every", "0"),
                         ("refresh", "0"), ("refresh", "1.5"), ("prefix_tokens", "1"), ("vector_lr", "-1"),
                         ("vector_anchor", "-1"), ("update_blocks", "1"), ("temperature", "0"), ("bandit_lr", "0"),
                         ("bandit_explore", "0"), ("forget_weight", "-1"), ("grow_fraction", "0"),
                         ("grow_fraction", "1.5"), ("grow_order", "farthest"))],
    Case("residual-bf16-not-a-bool", ["train", *R, "-n", "{other}", "--set", "train.residual_bf16=maybe"],
         ("`train.residual_bf16`", "'maybe'")),
    # tethers during training
    Case("tethers-during-not-a-bool", ["train", *R, "-n", "{other}", "--set", "tethers.during=maybe"],
         ("`tethers.during`", "'maybe'")),
    *[Case(f"tethers-{key.replace('_', '-')}-{value}", ["train", *R, "-n", "{other}", "--set", "tethers.during=true",
                                                        "--set", f"tethers.{key}={value}"], (f"`tethers.{key}`", value))
      for key, value in (("threshold", "1.5"), ("threshold", "-2"), ("window", "1"), ("loss_delta", "-0.1"),
                         ("loss_delta", "1"), ("grad_norm", "-1"), ("max_merges_per_epoch", "0"), ("formula", "mean"),
                         ("compare", "shared"), ("scope", "model"), ("keep_at_least", "0"),
                         ("max_group", "1"), ("max_group", "-1"))],
    Case("set-without-equals", ["index", *R, "--set", "graph.k"], ("--set", "graph.k")),
    Case("config-file-missing", ["index", *R, "--config", "{tmp}/nope.yaml"], ("nope.yaml",)),
    Case("config-file-bad-yaml", ["index", *R, "--config", "{tmp}/bad.yaml"], ("bad.yaml", "not valid YAML"),
         inputs={"bad.yaml": "graph: [unclosed\n"}),
    Case("stale-stage", ["index", *R, "--set", "corpus.max_documents=3"], ("`index` (changed: corpus)", "--force")),
    Case("stale-stage-by-config-file", ["nucleate", *R, "--config", "{tmp}/c.yaml"], ("changed: chunk",),
         inputs={"c.yaml": "chunk:\n  max_tokens: 64\n"}),
    Case("force-with-missing-corpus-keeps-records", ["index", *R, "--force", "--set", "corpus.paths=[{tmp}/no.txt]"],
         ("corpus.paths", "no.txt")),
    Case("force-with-bad-target-modules", ["train", *R, "--force", "--set", "lora.target_modules=[q_porj]"],
         ("lora.target_modules", "'q_porj'", "Did you mean 'q_proj'")),
    Case("target-modules-before-training", ["train", *R, "-n", "{other}", "--set", "lora.target_modules=[attn]"],
         ("lora.target_modules", "'attn' matches no layer")),
    Case("target-modules-regex", ["explore", *R, "--set", "lora.target_modules=zzz.*"], ("pattern 'zzz.*'",)),
    Case("target-modules-new-run", ["run", "--run-dir", "{tmp}/fresh", "--set", "lora.target_modules=[nope]"],
         ("lora.target_modules", "'nope'"), start="new"),
    Case("block-above-context", ["train", *R, "-n", "{other}", "--force", "--set", "train.block_size=4096"],
         ("train.block_size", "4096", "context length (512)")),
    Case("no-cuda-train", ["train", *R, "-n", "{other}", "--force", "--set", "train.device=cuda"], ("train.device", "no CUDA")),
    Case("no-cuda-embed", ["index", "--run-dir", "{tmp}/fresh", "--set", "embed.device=cuda:1"],
         ("embed.device", "no CUDA"), start="new"),
    Case("embed-model-missing", ["index", "--run-dir", "{tmp}/fresh", "--set", "embed.model={tmp}/nomodel"],
         ("embed.model", "nomodel"), start="new"),
    Case("index-kind-typo", ["index", "--run-dir", "{tmp}/fresh", "--set", "index.factory=hnws"],
         ("Did you mean 'hnsw'",), start="new"),
    Case("hf-base-missing", ["run", "--run-dir", "{tmp}/fresh", "--set", "model.base={tmp}/nobase"],
         ("model.base", "nobase"), start="new"),
    Case("seed-graph-missing", ["nucleate", *R, "--force", "--set", "nucleate.seed_graph={tmp}/kg.yaml"],
         ("kg.yaml",), start="indexed"),
    Case("seed-graph-invalid", ["nucleate", *R, "--set", "nucleate.seed_graph={tmp}/kg.yaml"],
         ("kg.yaml", "concepts"), start="indexed", inputs={"kg.yaml": "concepts: 3\n"}),
    Case("tensorboard-without-package", ["train", *R, "-n", "{other}", "--force", "--set", "train.tensorboard=true"],
         ("train.tensorboard",)) if importlib.util.find_spec("tensorboard") is None else None,
    # --- command options
    Case("unknown-neighborhood", ["train", *R, "-n", "topic-99"], ("unknown neighbourhood 'topic-99'",)),
    Case("bad-nb-id", ["train", *R, "-n", "../escape"], ("../escape",)),
    Case("topics-out-of-range", ["train", *R, "-n", "mine", "--topics", "3,99"], ("--topics", "99")),
    Case("topics-not-numbers", ["train", *R, "-n", "mine", "--topics", "a,b"], ("--topics", "'a,b'")),
    Case("joint-with-nb", ["train", *R, "--joint", "-n", "x"], ("--joint", "-n")),
    Case("joint-needs-two", ["train", *R, "--joint"], ("at least 2",)),
    Case("train-before-nucleate", ["train", *R], ("no finished `nucleate` stage",), start="indexed"),
    Case("explore-before-nucleate", ["explore", *R], ("no finished `nucleate` stage",), start="indexed"),
    Case("workers-negative", ["explore", *R, "--workers", "-1"], ("--workers must be >= 0",)),
    Case("workers-inline", ["explore", *R, "--workers", "2", "--set", "jobs.mode=inline"], ("needs Celery",)),
    Case("retrieve-topic-range", ["retrieve", *R, "--topic", "99", "x"], ("--topic must be a topic id",)),
    Case("worker-queue-typo", ["worker", *R, "--queues", "trian"], ("Did you mean 'train'",)),
    Case("worker-gpus", ["worker", *R, "--gpus", "0,x"], ("--gpus",)),
    Case("adapters-file-missing", ["adapters", "score", *R, "--file", "{tmp}/texts.txt"], ("texts.txt",),
         start="adapters"),
    Case("retrieve-k-zero", ["retrieve", *R, "-k", "0", "x"], ("-k must be >= 1, got 0",)),
    Case("retrieve-empty-query", ["retrieve", *R, "  "], ("the query is empty",)),
    Case("nucleus-by-topics", ["train", *R, "-n", "nucleus", "--topics", "1"], ("chosen by `nucleus nucleate`",)),
    Case("report-on-new-dir", ["report", "--run-dir", "{tmp}/fresh"], ("no finished `index` stage",), start="new"),
    Case("index-topics-no-run", ["index", "--run-dir", "{tmp}/fresh", "--topics"], ("not a Nucleus run",),
         start="new"),
    Case("policy-typo", ["explore", *R, "--set", "explore.policy=lerned"], ("Did you mean 'learned'",)),
    Case("merge-without-adapters", ["adapters", "merge", *R], ("holds no neighbourhood adapter",)),
    Case("route-without-texts", ["adapters", "route", *R], ("give at least one text",), start="adapters"),
    Case("eval-without-adapters", ["adapters", "eval", *R], ("holds no neighbourhood adapter",)),
    Case("worker-concurrency-zero", ["worker", *R, "--concurrency", "0"], ("--concurrency must be >= 1",)),
    Case("config-show-broken-run-config", ["config", "show", *R], ("config.yaml", "not valid YAML"),
         setup=overwrite("config.yaml", b"seed: [\n")),
    Case("config-validate-missing", ["config", "validate", "{tmp}/none.yaml"], ("none.yaml",), start="new"),
    # --- nucleus synth: a world that cannot be generated writes nothing
    *[Case(f"synth-{option}-{value}", ["synth", "--out", "{tmp}/fresh", f"--{option}", value, *extra],
           (f"--{option}",), start="new")
      for option, value, extra in (
          ("communities", "1", []), ("entities", "20", []), ("entities", "many", []),
          ("docs-per-entity", "0", []), ("bridge-fraction", "1.5", []),
          ("nucleus-communities", "8", ["--communities", "8"]), ("candidates", "1", []), ("seed", "x", []))],
    Case("synth-out-not-empty", ["synth", "--out", "{run}"], ("--out", "not an empty directory"), start="foreign",
         setup=foreign_files),
    # --- network services: bounded, the URL named, the password never shown
    Case("connect-timeout-zero", ["explore", *R, "--set", "jobs.connect_timeout_s=0"], ("`jobs.connect_timeout_s`",)),
    Case("explore-broker-unreachable", ["explore", *R, "--set", "jobs.broker_url=redis://:s3cret@127.0.0.1:{closed}/0",
                                        "--set", "jobs.connect_timeout_s=0.5"],
         ("jobs.broker_url", f"127.0.0.1:{CLOSED}", "within 0.5 s")),
    Case("explore-amqp-unreachable", ["explore", *R, "--set", "jobs.broker_url=amqp://guest:s3cret@127.0.0.1:{closed}//",
                                      "--set", "jobs.connect_timeout_s=0.5"], ("jobs.broker_url", "amqp://")),
    Case("explore-backend-unreachable", ["explore", *R, "--workers", "1", "--set",
                                         "jobs.result_backend=redis://127.0.0.1:{closed}/1",
                                         "--set", "jobs.connect_timeout_s=0.5"], ("jobs.result_backend",)),
    Case("worker-broker-unreachable", ["worker", *R, "--set", "jobs.broker_url=redis://:s3cret@127.0.0.1:{closed}/0",
                                       "--set", "jobs.connect_timeout_s=0.5"], ("jobs.broker_url",)),
    # --- damaged artifacts: the file, what is wrong, the command that rebuilds it
    Case("meta-truncated", ["index", *R], ("meta.json' is damaged", "--force"), setup=truncate("meta.json")),
    Case("meta-not-a-run-record", ["retrieve", *R, "x"], ("meta.json' is damaged",),
         setup=overwrite("meta.json", b"[1, 2]")),
    Case("config-yaml-broken", ["train", *R], ("config.yaml", "not valid YAML"),
         setup=overwrite("config.yaml", b"seed: [\n")),
    Case("faiss-index-truncated", ["retrieve", *R, "storm"], ("faiss.index' is damaged", "nucleus index"),
         setup=truncate("index/faiss.index")),
    Case("assignments-truncated", ["retrieve", *R, "storm"], ("assignments.parquet' is damaged", "nucleus index"),
         setup=truncate("topics/assignments.parquet")),
    Case("topics-json-truncated", ["index", *R, "--topics"], ("topics.json' is damaged", "nucleus index"),
         setup=truncate("topics/topics.json")),
    Case("corpus-state-broken", ["retrieve", *R, "storm"], ("corpus", "damaged", "nucleus index"),
         setup=overwrite("corpus/state.json", b"{")),
    Case("ledger-not-sqlite", ["jobs", *R], ("ledger.sqlite' is damaged", "nucleus explore"),
         setup=overwrite("ledger.sqlite", b"this is not a database" * 100)),
    Case("nucleus-json-broken", ["train", *R, "-n", "{other}"], ("neighborhoods/nucleus.json' is damaged",
                                                                  "nucleus nucleate"),
         setup=truncate("neighborhoods/nucleus.json")),
    Case("adapter-record-broken", ["adapters", "list", *R], ("neighborhood.json' is damaged", "--force"),
         start="adapters", setup=adapter_file("neighborhood.json")),
    Case("adapter-weights-truncated", ["adapters", "compat", *R], ("adapter_model.safetensors",),
         start="adapters", setup=adapter_file("adapter_model.safetensors")),
    Case("checkpoint-broken", ["train", *R, "-n", "{other}"], ("state.json' is damaged", "--restart"),
         setup=bad_checkpoint),
    Case("base-config-broken", ["train", *R, "-n", "{other}"], ("model/base",),
         setup=overwrite("model/base/config.json", b"{not json")),
    # --- corpus files (a first index: no run is left behind)
    Case("jsonl-bad-line", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/c.jsonl]"],
         ("c.jsonl' line 2", "one JSON object"), start="new",
         inputs={"c.jsonl": '{"text": "fine"}\n{"text": "cut\n'}),
    Case("corpus-fifo", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/pipe.txt]"],
         ("pipe.txt", "not a regular file"), start="new"),
    Case("corpus-bad-encoding", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/b.txt]"],
         ("b.txt", "byte offset 4"), start="new", inputs={"b.txt": b"abc \xff\xfe"}),
    Case("corpus-empty", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/e.txt]"],
         ("no document with text",), start="new", inputs={"e.txt": "\n \n"}),
    Case("corpus-csv-no-column", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/c.csv]"],
         ("corpus.text_field", "'text'"), start="new", inputs={"c.csv": "body\nhello world\n"}),
    Case("corpus-unknown-extension", ["index", "--run-dir", "{tmp}/fresh", "--set", "corpus.paths=[{tmp}/c.xyz]"],
         ("corpus.format", ".xyz"), start="new", inputs={"c.xyz": "hello"}),
]
CASES = [c for c in CASES if c is not None]


def _tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 or 'dir'} of everything under `root`, logs aside."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel == "logs" or rel.startswith("logs/"):
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def runs(small_run, trained_run, adapters_run):
    return {"indexed": small_run, "trained": trained_run, "adapters": adapters_run[0]}


def test_the_table_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_and_damage_change_nothing(case: Case, runs, tmp_path):
    run = tmp_path / "run"
    if case.start in runs:
        shutil.copytree(runs[case.start], run)
    elif case.start == "foreign":
        run.mkdir()
    for name, data in case.inputs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    if case.id == "corpus-fifo":
        os.mkfifo(tmp_path / "pipe.txt")
    names = {"run": run, "tmp": tmp_path, "closed": CLOSED}
    if (run / "neighborhoods" / "nucleus.json").is_file():
        names["other"] = first_other_topic(run)
    if case.setup is not None:
        case.setup(run)
    args = [a.format(**names) for a in case.args]
    watched = [run, tmp_path / "fresh"]
    before = {str(w): _tree(w) for w in watched}

    result = CliRunner().invoke(app, args, catch_exceptions=False)

    assert result.exit_code == case.code, (args, result.output)
    assert "Traceback" not in result.output, result.output
    for needle in case.needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "s3cret" not in result.output
    for w in watched:
        assert _tree(w) == before[str(w)], f"{case.id} changed {w}"


# ------------------------------------------------------------------------- kills


def _rows(run: Path, nb: str) -> list[dict]:
    path = run / "logs" / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("nb") == nb]


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_logs_each_step_once(trained_run_copy):
    run = trained_run_copy
    nb = first_other_topic(run)
    args = ["train", "--run-dir", str(run), "-n", nb, "--set", "lora.steps=60"]
    killed_at = kill_at_checkpoint(args, run / "checkpoints" / nb / "latest" / "state.json", 20)

    # the same command (no --resume needed), here in pieces of 2 blocks, as after running out of
    # GPU memory: pieces compute the same batch, so the checkpoint still resumes
    r = nucleus(*args, "--set", "train.micro_batch_size=2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resumed_from"] == killed_at > 0 and out["steps"] == 60
    assert f"resuming from the checkpoint at step {killed_at} of 60" in r.stderr
    steps = [(row["step"], "train/loss" in row) for row in _rows(run, nb)]
    assert len(steps) == len(set(steps)), "a step logged twice"
    assert sorted(s for s, loss in steps if loss) == list(range(10, 61, 10))
    assert not (run / "checkpoints" / nb).exists()


def _takes_sigint() -> None:
    """In the child before exec: SIGINT unblocked and at its default, so Python turns it into
    KeyboardInterrupt. A child inherits an ignored or blocked SIGINT, and in the full suite
    something earlier left the test process so (the training ran to its end and exited 0)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_says_resume_and_the_same_command_does(trained_run_copy):
    run = trained_run_copy
    nb = first_other_topic(run)
    # 300 steps: seconds of training after the first checkpoint (step 10), for the interrupt to land in
    args = [sys.executable, "-m", "pipeline.cli", "train", "--run-dir", str(run), "-n", nb, "--set", "lora.steps=300"]
    state = run / "checkpoints" / nb / "latest" / "state.json"
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_takes_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not state.is_file():
        time.sleep(0.05)
    assert state.is_file() and proc.poll() is None, "the training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err, err
    assert "Traceback" not in err
    step = json.loads(state.read_text())["step"]

    r = nucleus(*args[3:], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resumed_from"] == step > 0, r.stderr


@pytest.mark.slow
def test_restart_starts_over_and_says_so(trained_run_copy):
    run = trained_run_copy
    nb = first_other_topic(run)
    args = ["train", "--run-dir", str(run), "-n", nb, "--set", "lora.steps=40"]
    kill_at_checkpoint(args, run / "checkpoints" / nb / "latest" / "state.json", 10)
    r = nucleus(*args, "--restart", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resumed_from"] == 0, r.stderr
    assert "starting over" in r.stderr
    assert [row["step"] for row in _rows(run, nb) if "train/loss" in row] == [10, 20, 30, 40]

