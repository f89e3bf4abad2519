"""The `nucleus` command line: a thin table from command names to stage functions.

Exit codes: 0 ok, 2 bad input (a message, no traceback), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from jobs import ledger as job_ledger
from jobs import worker as worker_service
from jobs.executor import InlineExecutor, open_executor
from jobs.executor import check_options as check_executor_options
from pipeline import adapters as adapters_stage
from pipeline import distributed
from pipeline import explore as explore_stage
from pipeline import index as index_stage
from pipeline import nucleate as nucleate_stage
from pipeline import report as report_stage
from pipeline import retrieve as retrieve_stage
from pipeline import run as run_stage
from pipeline import sweep as sweep_stage
from pipeline import train as train_stage
from pipeline import train_joint
from pipeline.config import NucleusConfig, load_config_file, resolve_config, to_yaml
from pipeline.errors import DamagedFile, JobFailed, UserError
from pipeline.workspace import Workspace, rebuild_hint
from retrieval import known_graph

# Command name -> stage function `run(cfg, ws, ...) -> Result`. tests/pipeline/test_cli.py keeps
# this table, the typer commands and the stage modules in sync.
STAGES: dict[str, Callable[..., Any]] = {
    "index": index_stage.run,
    "nucleate": nucleate_stage.run,
    "train": train_stage.run,
    "explore": explore_stage.run,
    "report": report_stage.run,
    "run": run_stage.run,
    "retrieve": retrieve_stage.run,
    "adapters": adapters_stage.run,
    "sweep": sweep_stage.run,
}
# Commands that serve or inspect a run rather than run a stage: Celery workers and the job ledger.
SERVICES: dict[str, Callable[..., Any]] = {
    "worker": worker_service.run,
    "jobs": job_ledger.summary,
}
# Commands that touch no run directory: the generator of corpora with a known knowledge graph.
TOOLS: dict[str, Callable[..., Any]] = {
    "synth": known_graph.write_corpus,
}

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Nucleus: knowledge-nucleated, curiosity-driven curriculum training.")
config_app = typer.Typer(no_args_is_help=True, help="Show, validate or describe configurations.")
app.add_typer(config_app, name="config")
modules_app = typer.Typer(no_args_is_help=True, help="The swappable parts: their tags and hyperparameters.")
app.add_typer(modules_app, name="modules")

RunDir = Annotated[Path, typer.Option("--run-dir", "-r", help="Run directory (all state lives here).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a config key: --set graph.k=8 (value parsed as YAML). Repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage; accept config changes.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", help="Start N local Celery workers for this command's jobs (stopped at the end); 0 = per jobs config.")]

log = logging.getLogger("nucleus")


def _emit(obj: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False) if as_json else human(obj))


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Map exceptions to exit codes: UserError -> 2 with its message, anything else -> 1."""
    try:
        yield
    except DamagedFile as e:
        typer.echo(f"error: {e}{rebuild_hint(e.path)}", err=True)
        raise typer.Exit(2) from None
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        if e.filename is None:  # not about a file: a bug or a service, with its traceback below
            _internal_error()
        # The machine refused a file operation (permissions, a full disk, a path that is not a
        # folder): bad input of the environment, not a bug.
        target = f"'{e.filename}'" + (f" -> '{e.filename2}'" if e.filename2 else "")
        typer.echo(f"error: {target}: {e.strerror or e} (errno {e.errno}). Check that the path exists, is "
                   f"readable and writable by this user, and that its disk has free space.", err=True)
        raise typer.Exit(2) from None
    except JobFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: run the same command again to resume (--restart or --force starts over).", err=True)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception:
        _internal_error()


def _internal_error() -> None:
    traceback.print_exc()
    typer.echo("internal error (a bug in Nucleus): please report it with the traceback above.", err=True)
    raise typer.Exit(1) from None


def _resolve(ws: Workspace | None, config: Path | None, sets: list[str] | None) -> NucleusConfig:
    stored = ws.stored_config() if ws is not None else None
    return resolve_config(stored, config, sets)


@contextlib.contextmanager
def _stage(command: str, run_dir: Path, config: Path | None, sets: list[str] | None, force: bool,
           check: Callable[[NucleusConfig, Workspace], None] | None = None,
           ) -> Iterator[tuple[NucleusConfig, Workspace]]:
    """A command that writes to the run directory. Everything that can be checked is checked
    before anything is written: the directory is a run (or new), the config is valid and not
    stale, and the stage's own `check` (paths, devices, the model's limits) passes. Then the
    config is stored and the command logged; a rejection before the first artifact undoes that."""
    if distributed.world_size() > 1:  # under torchrun: see pipeline/distributed.py
        if command != "train":
            raise UserError(f"`nucleus {command}` runs in one process; only `nucleus train` (the nucleus or "
                            f"one neighbourhood adapter) runs data-parallel under torchrun.")
        if not distributed.is_main():  # rank 0 checks and keeps the records; the others only train
            ws = Workspace(run_dir)
            yield _resolve(ws, config, sets), ws
            return
    ws = Workspace(run_dir)
    ws.check_run_dir()
    cfg = _resolve(ws, config, sets)
    ws.check_stale(cfg, force)
    if check is not None:
        check(cfg, ws)
    with ws.command(cfg, command, force):
        yield cfg, ws


def _reader(command: str, run_dir: Path, config: Path | None,
            sets: list[str] | None) -> tuple[NucleusConfig, Workspace]:
    """A command that only reads a finished run: it must exist and its config must match."""
    ws = Workspace(run_dir)
    if not ws.exists():
        raise UserError(f"--run-dir '{run_dir}' is not a Nucleus run directory (no meta.json). "
                        f"Create one with `nucleus index --run-dir {run_dir}`.")
    cfg = _resolve(ws, config, sets)
    stale = ws.stale_stages(cfg)
    if stale:
        changes = "; ".join(f"`{s}` (changed: {', '.join(c)})" for s, c in stale.items())
        raise UserError(f"`{command}` cannot use stage {changes} of '{ws.root}' with a changed "
                        f"config. Drop the change or redo the stage with --force.")
    return cfg, ws


# ------------------------------------------------------------------------------ stages


def _index_human(r: dict) -> str:
    steps = ", ".join(r["steps_run"]) or "nothing (all artifacts up to date)"
    return (f"indexed {r['documents']} documents -> {r['passages']} passages "
            f"({r['heldout']} held out), {r['topics']} topics, {r['graph_edges']} graph edges; "
            f"{r['factory']} index, dim {r['dim']}.\nran: {steps} in {r['seconds']} s\n"
            + (f"topics against the corpus's true communities: NMI {r['topics_nmi']:.3f}\n"
               if r.get("topics_nmi") is not None else "")
            + f"run directory: {r['run_dir']}")


def _topics_human(topics: list[dict]) -> str:
    return "\n".join(f"{t['id']:>4}  size {t['size']:>5}  [{', '.join(t['keywords'])}]"
                     f"  neighbours {t['neighbors']}" for t in topics)


@app.command()
def index(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False,
          force: ForceOpt = False, workers: WorkersOpt = 0,
          topics: Annotated[bool, typer.Option("--topics", help="List the topics of a built index.")] = False):
    """Chunk, embed and index the corpus; cluster it into topics joined in a topic graph."""
    with _guard():
        if topics:
            _, ws = _reader("index --topics", run_dir, config, set_)
            _emit(index_stage.list_topics(ws), json_, _topics_human)
            return
        def check(cfg: NucleusConfig, ws: Workspace) -> None:
            check_executor_options(cfg, workers)
            index_stage.check(cfg, ws)

        with _stage("index", run_dir, config, set_, force, check) as (cfg, ws), \
                open_executor(cfg, ws, workers) as ex:
            # embedding shards go to workers only when there are workers; in process, index embeds itself
            result = STAGES["index"](cfg, ws, force=force, executor=None if isinstance(ex, InlineExecutor) else ex)
        _emit(result.to_json(), json_, _index_human)


def _nucleate_human(r: dict) -> str:
    lines = [f"nucleus ({r['method']}): topics {r['nucleus_topics']}" + (" (already done)" if r["skipped"] else "")]
    lines += [f"  concept {c}: topics {t}" for c, t in r["concepts"].items()]
    if r["unmapped"]:
        lines.append(f"  warning: concepts mapped to no topic: {', '.join(r['unmapped'])}")
    if r["knowledge_edges"]:
        lines.append(f"  {r['knowledge_edges']} knowledge edges added to the topic graph")
    return "\n".join(lines)


@app.command()
def nucleate(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False,
             force: ForceOpt = False):
    """Choose the nucleus: map the seed knowledge graph to topics (or take central topics)."""
    with _guard():
        with _stage("nucleate", run_dir, config, set_, force, nucleate_stage.check) as (cfg, ws):
            result = STAGES["nucleate"](cfg, ws, force=force)
        _emit(result.to_json(), json_, _nucleate_human)


def _train_human(r: dict) -> str:
    if r["skipped"]:
        return f"{r['neighborhood']}: already trained with this config -> {r['output']}"
    nb = r["neighborhood"]
    key = "nucleus/ppl" if nb == "nucleus" else f"nb/{nb}/ppl"
    before, after = r["metrics_before"].get(key, float("nan")), r["metrics"].get(key, float("nan"))
    return (f"trained {nb} ({r['kind']}, {r['trainable_params']:,} trainable parameters): "
            f"{r['steps']} steps, {r['tokens']:,} tokens, {r['tokens_per_s']:,.0f} tokens/s\n"
            f"held-out perplexity of {nb}: {before:.2f} -> {after:.2f}; natural mixture "
            f"{r['metrics_before'].get('heldout/ppl', float('nan')):.2f} -> {r['metrics'].get('heldout/ppl', float('nan')):.2f}\n"
            f"saved: {r['output']}")


def _topic_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--topics must be comma-separated topic ids (e.g. 3,4,7), got '{value}'.") from None


@app.command()
def train(run_dir: RunDir,
          neighborhood: Annotated[Optional[str], typer.Option(
              "--neighborhood", "-n", help="Neighbourhood to train as a LoRA adapter (default: the nucleus).")] = None,
          topics: Annotated[Optional[str], typer.Option(
              "--topics", help="Define the neighbourhood from these topic ids, e.g. 3,4,7.")] = None,
          joint: Annotated[bool, typer.Option(
              "--joint", help="Retrain every neighbourhood adapter together: a shared adapter plus one expert each.")
          ] = False,
          resume: Annotated[bool, typer.Option(
              "--resume/--restart", help="An interrupted training continues from its checkpoint (default); "
                                         "--restart discards the checkpoint and starts over.")] = True,
          config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False, force: ForceOpt = False):
    """Train the nucleus (the base), one neighbourhood as its own LoRA adapter, or (--joint) all
    neighbourhoods together."""
    with _guard():
        if joint and (neighborhood or topics):
            raise UserError("train: --joint trains every neighbourhood adapter of the run; drop -n/--topics.")
        nb_topics = _topic_list(topics)

        def check(cfg: NucleusConfig, ws: Workspace) -> None:
            if joint:
                train_joint.check(cfg, ws)
            else:
                train_stage.check(cfg, ws, neighborhood, nb_topics, force, resume)

        if joint and distributed.world_size() > 1:
            raise UserError("train --joint runs in one process (it switches experts between batches); "
                            "launch it without torchrun.")
        with _stage("train", run_dir, config, set_, force, check) as (cfg, ws):
            if joint:
                result = train_joint.train_jointly(cfg, ws, resume=resume, force=force)
            else:
                result = STAGES["train"](cfg, ws, neighborhood, nb_topics, resume=resume, force=force)
        if distributed.is_main():
            _emit(result.to_json(), json_, _joint_human if joint else _train_human)


def _joint_human(r: dict) -> str:
    if r["skipped"]:
        return f"{', '.join(r['members'])}: already trained jointly with this config"
    lines = [f"trained {len(r['members'])} neighbourhoods jointly (shared rank {r['shared_rank']} + expert rank "
             f"{r['expert_rank']}, {r['trainable_params']:,} trainable parameters): {r['steps']} steps, "
             f"{r['tokens']:,} tokens"]
    for a in r["adapters"]:
        ppl = a["metrics"].get(f"nb/{a['neighborhood']}/ppl", float("nan"))
        lines.append(f"  {a['neighborhood']:<12} held-out perplexity {ppl:.2f} -> {a['output']}")
    return "\n".join(lines)


def _explore_human(r: dict) -> str:
    lines = [f"{r['rounds_done']} rounds done; {len(r['neighborhoods'])} neighbourhoods explored"]
    for nb in r["neighborhoods"]:
        lines.append(f"  round {nb['round']}: {nb['nb_id']:<12} topics {nb['topics']}  {nb['passages']} passages  "
                     f"learning progress {nb['progress']:+.4f}/1k tok  forgetting {nb['forgetting']:+.4f}")
    if r["spearman_rho"] == r["spearman_rho"]:  # not nan
        lines.append(f"curiosity model: Spearman rho(predicted, realised progress) = {r['spearman_rho']:.3f}")
    if r["message"]:
        lines.append(r["message"])
    return "\n".join(lines)


@app.command()
def explore(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False,
            force: ForceOpt = False, workers: WorkersOpt = 0):
    """Explore: score the frontier, train the most promising neighbourhoods, learn from the progress."""
    with _guard():
        def check(cfg: NucleusConfig, ws: Workspace) -> None:
            check_executor_options(cfg, workers)
            explore_stage.check(cfg, ws)

        with _stage("explore", run_dir, config, set_, force, check) as (cfg, ws), \
                open_executor(cfg, ws, workers) as ex:
            result = STAGES["explore"](cfg, ws, ex)
        _emit(result.to_json(), json_, _explore_human)


@app.command()
def report(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Write reports/report.html with plots of the topic graph, learning curves and curiosity."""
    with _guard():
        with _stage("report", run_dir, config, set_, False) as (cfg, ws):
            result = STAGES["report"](cfg, ws)
        _emit(result.to_json(), json_, lambda r: f"report: {r['path']} ({len(r['plots'])} plots)")


def _run_human(r: dict) -> str:
    parts = [_index_human(r["index"]), _nucleate_human(r["nucleate"]), _train_human(r["nucleus"])]
    if r["explore"]:
        parts.append(_explore_human(r["explore"]))
    parts.append(f"report: {r['report']['path']}")
    return "\n\n".join(parts)


@app.command("run")
def run_command(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False,
                force: ForceOpt = False):
    """The whole job: index, nucleate, train the nucleus, explore, report (resumes what is done)."""
    with _guard():
        with _stage("run", run_dir, config, set_, force, run_stage.check) as (cfg, ws):
            result = STAGES["run"](cfg, ws, force=force)
        _emit(result.to_json(), json_, _run_human)


def _hits_human(hits: list[dict]) -> str:
    if not hits:
        return "no passages found."
    lines = []
    for rank, h in enumerate(hits, 1):
        text = " ".join(h["text"].split())
        lines.append(f"{rank:>2}. [{h['score']:.3f}] {h['title']}  (passage {h['passage_id']}, "
                     f"topic {h['topic_id']}: {h['topic_label']})\n    {text[:240]}")
    return "\n".join(lines)


@app.command()
def retrieve(query: Annotated[str, typer.Argument(help="Text to search for.")], run_dir: RunDir,
             k: Annotated[Optional[int], typer.Option("-k", help="Passages to return.")] = None,
             topic: Annotated[Optional[int], typer.Option("--topic", help="Search one topic only.")] = None,
             config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Ranked passages for a query."""
    with _guard():
        cfg, ws = _reader("retrieve", run_dir, config, set_)
        result = STAGES["retrieve"](cfg, ws, query, k=k, topic=topic)
        _emit(result.to_json(), json_, _hits_human)


# ------------------------------------------------------------------------------ adapters

adapters_app = typer.Typer(no_args_is_help=True, help="Use the neighbourhood adapters together: list, route, "
                                                       "score, generate, compat, merge, eval.")
app.add_typer(adapters_app, name="adapters")
TextsArg = Annotated[Optional[list[str]], typer.Argument(help="Texts (or --file).", show_default=False)]
FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="A UTF-8 file with one text per line.")]


def _texts(texts: list[str] | None, file: Path | None) -> list[str]:
    out = list(texts or [])
    if file is not None:
        try:
            out += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--file '{file}' cannot be read as UTF-8 text ({type(e).__name__}: {e}).") from None
    return out


def _adapters(action: str, run_dir: Path, config: Path | None, sets: list[str] | None, as_json: bool,
              **kwargs: Any) -> None:
    with _guard():
        if action == "merge":  # writes adapters/ and the ledger
            with _stage("adapters merge", run_dir, config, sets, False) as (cfg, ws):
                result = STAGES["adapters"](cfg, ws, action)
        else:
            cfg, ws = _reader(f"adapters {action}", run_dir, config, sets)
            result = STAGES["adapters"](cfg, ws, action, **kwargs)
        _emit(result.to_json(), as_json, lambda r: adapters_stage.human(action, r))


@adapters_app.command("list")
def adapters_list(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """The adapters with their neighbourhoods: topics, passages, tokens, perplexity."""
    _adapters("list", run_dir, config, set_, json_)


@adapters_app.command("route")
def adapters_route(run_dir: RunDir, texts: TextsArg = None, file: FileOpt = None, config: ConfigFile = None,
                   set_: SetOpt = None, json_: JsonOpt = False):
    """Which neighbourhood's adapter each text goes to (nearest centroid; top_k with weights)."""
    with _guard():
        texts = _texts(texts, file)
    _adapters("route", run_dir, config, set_, json_, texts=texts)


@adapters_app.command("score")
def adapters_score(run_dir: RunDir, texts: TextsArg = None, file: FileOpt = None, config: ConfigFile = None,
                   set_: SetOpt = None, json_: JsonOpt = False):
    """Perplexity of each text under its routed adapter (or a top-k mixture)."""
    with _guard():
        texts = _texts(texts, file)
    _adapters("score", run_dir, config, set_, json_, texts=texts)


@adapters_app.command("generate")
def adapters_generate(prompt: Annotated[str, typer.Argument(help="Text to continue.")], run_dir: RunDir,
                      config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Continue a prompt with the adapter it routes to."""
    _adapters("generate", run_dir, config, set_, json_, prompt=prompt)


@adapters_app.command("compat")
def adapters_compat(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Tether compatibility: per-layer cosine similarity of every pair's LoRA deltas, and its mean."""
    _adapters("compat", run_dir, config, set_, json_)


@adapters_app.command("merge")
def adapters_merge(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Merge groups above adapters.merge_threshold into one peft adapter each; record them in the ledger."""
    _adapters("merge", run_dir, config, set_, json_)


@adapters_app.command("eval")
def adapters_eval(run_dir: RunDir, config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Routing accuracy, diagonal fraction, specialisation matrix, base/routed/merged perplexity."""
    _adapters("eval", run_dir, config, set_, json_)


# ------------------------------------------------------------------------------ jobs


@app.command()
def worker(run_dir: RunDir,
           queues: Annotated[Optional[str], typer.Option(
               "--queues", "-Q", help="Queues to serve, comma-separated: expand,train,embed (default: all).")] = None,
           concurrency: Annotated[Optional[int], typer.Option(
               "--concurrency", help="Worker processes on a CPU machine (default: jobs.concurrency).")] = None,
           gpus: Annotated[Optional[str], typer.Option(
               "--gpus", help="One worker process per GPU, e.g. 0,1 (each sees only its GPU).")] = None,
           config: ConfigFile = None, set_: SetOpt = None):
    """Serve a run's job queues with Celery workers (broker from the run's config or --set jobs.broker_url=...)."""
    with _guard():
        ws = Workspace(run_dir)
        cfg = _resolve(ws, config, set_)
        code = SERVICES["worker"](cfg, ws, queues, concurrency, gpus, config, set_)
    raise typer.Exit(code)


def _jobs_human(r: dict) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in r["counts"].items())
    lines = [f"jobs: {counts}" if r["jobs"] else "no jobs recorded in this run yet."]
    for j in r["jobs"]:
        lines.append(f"  {j['state']:<8} {j['job_id']:<48} attempts {j['attempts']}"
                     + (f"  on {j['worker']}" if j["worker"] else ""))
        if j["state"] == "failed" and j["error"]:
            lines += [f"           {line}" for line in j["error"].splitlines()]
    return "\n".join(lines)


@app.command()
def jobs(run_dir: RunDir, json_: JsonOpt = False):
    """Show the run's jobs: pending, running, done and failed, with attempts and errors."""
    with _guard():
        ws = Workspace(run_dir)
        if not ws.exists():
            raise UserError(f"--run-dir '{run_dir}' is not a Nucleus run directory (no meta.json).")
        _emit(SERVICES["jobs"](ws.root / "ledger.sqlite"), json_, _jobs_human)


# ------------------------------------------------------------------------------ synth


def _synth_human(r: dict) -> str:
    c = r["counts"]
    return (f"wrote a world of {c['entities']:,} entities ({c['persons']:,} persons, {c['cities']:,} cities, "
            f"{c['organisations']:,} organisations) to {r['out']}: {c['documents']:,} documents, {c['words']:,} words "
            f"(about {c['approx_tokens']:,} tokens), {c['questions']:,} questions ({c['questions_heldout']:,} held "
            f"out).\nUse it with --set \"corpus.paths=[{r['out']}/corpus.jsonl]\": index copies its questions and "
            f"true seed graph into the run.")


@app.command()
def synth(out: Annotated[Path, typer.Option("--out", "-o", help="New or empty folder to write the world into.")],
          entities: Annotated[int, typer.Option(help="Persons, cities and organisations together.")] = 2000,
          communities: Annotated[int, typer.Option(help="Communities (on a ring; bridges join neighbours).")] = 8,
          docs_per_entity: Annotated[int, typer.Option(help="Biographies per person.")] = 3,
          bridge_fraction: Annotated[float, typer.Option(help="Share of relations to a neighbouring community.")] = 0.1,
          nucleus_communities: Annotated[int, typer.Option(help="Communities of the true nucleus.")] = 1,
          candidates: Annotated[int, typer.Option(help="Candidate answers per question, the true one included.")] = 8,
          seed: Annotated[int, typer.Option(help="Seed: the same options give the same bytes.")] = 0,
          json_: JsonOpt = False):
    """Write a corpus whose knowledge graph is known: biographies, the true seed graph, questions."""
    with _guard():
        spec = known_graph.KnownGraphSpec(entities, communities, docs_per_entity, bridge_fraction,
                                          nucleus_communities, candidates, seed)
        _emit(TOOLS["synth"](out, spec), json_, _synth_human)


# ------------------------------------------------------------------------------ config


@config_app.command("show")
def config_show(run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r")] = None,
                config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """Print the resolved config (defaults < run dir < --config < --set)."""
    with _guard():
        ws = Workspace(run_dir) if run_dir else None
        cfg = _resolve(ws, config, set_)
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2) if json_ else to_yaml(cfg), nl=False)


@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="YAML config to check.")],
                    set_: SetOpt = None, json_: JsonOpt = False):
    """Check a config file without loading any model; exit 2 listing every problem."""
    with _guard():
        cfg = resolve_config(None, file, set_) if set_ else load_config_file(file)
        _emit({"file": str(file), "valid": True, "config": cfg.model_dump(mode="json")}, json_,
              lambda r: f"ok: '{r['file']}' is a valid Nucleus config.")


@config_app.command("schema")
def config_schema():
    """Print the JSON schema of the config (every key with its type, default and docs)."""
    typer.echo(json.dumps(NucleusConfig.model_json_schema(), indent=2))


def _sweep_human(r: dict) -> str:
    lines = [f"sweep '{r['study']}' in {r['storage']}: {r['trials_complete']} complete, {r['trials_failed']} failed"
             f" ({r['ran_here']} run by this worker)"]
    for t in sorted((t for t in r["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"]):
        lines.append(f"  #{t['number']:<3} val loss {t['value']:.4f} (ppl {t['validation_ppl']:.1f})  {t['params']}")
    if r["best"]:
        lines.append(f"best: #{r['best']['number']} {r['best']['params']}")
    a = r.get("ace")
    if a:
        lines.append(f"ACE (fit on {a['fit_on']} trials; leave-one-out rank correlation {a['loo_spearman']:.2f}; "
                     f"{a['untested_combinations']} of {a['combinations']} module combinations untested):")
        lines.append("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in a["importance"].items()))
        for c in a["best"]:
            seen = (f"measured {c['measured_best']:.4f} in {c['measured_trials']}" if c["measured_trials"]
                    else "untested")
            lines.append(f"  predicted {c['mean']:.4f} ± {c['sd']:.4f} ({seen})  {c['params']}")
    return "\n".join(lines)


@app.command()
def sweep(run_dir: RunDir,
          action: Annotated[str, typer.Argument(help="`run` (claim and run trials) or `report`.")] = "run",
          config: ConfigFile = None, set_: SetOpt = None, json_: JsonOpt = False):
    """An Optuna study over modules and hyperparameters; every `nucleus sweep` process is a worker."""
    with _guard():
        if action not in ("run", "report"):
            raise UserError(f"sweep: unknown action '{action}'. Choose run or report.")
        if action == "report":
            cfg, ws = _reader("sweep report", run_dir, config, set_)
            _emit(sweep_stage.report(cfg, ws).to_json(), json_, _sweep_human)
            return
        with _stage("sweep", run_dir, config, set_, False, sweep_stage.check) as (cfg, ws):
            result = STAGES["sweep"](cfg, ws)
        _emit(result.to_json(), json_, _sweep_human)


def _module_human(m: dict) -> str:
    lines = [f"{m['kind']}.{m['name']}: {m['summary']}"]
    if m["provides"]:
        lines.append(f"  provides: {', '.join(m['provides'])}")
    if m["needs"]:
        lines.append(f"  needs:    {', '.join(m['needs'])}")
    for p in m["params"]:
        rng = (f" in {p['choices']}" if p.get("choices") else
               f" in [{p['low']}, {p['high']}]{' (log)' if p.get('log') else ''}" if "low" in p else "")
        lines.append(f"  param {p['key']} ({p['kind']}, default {p['default']}){rng}")
    return "\n".join(lines)


@modules_app.command("list")
def modules_list(json_: JsonOpt = False):
    """Every module by kind, with what it provides and needs and its sweepable keys."""
    from curriculum import modules

    with _guard():
        cat = modules.catalogue()
        out = {kind: [m.to_json() for m in ms.values()] for kind, ms in cat.items()}
        def human(r: dict) -> str:
            lines = []
            for kind, ms in r.items():
                lines.append(f"{kind} ({modules.KINDS[kind]}):")
                for m in ms:
                    tags = [f"needs {', '.join(m['needs'])}"] if m["needs"] else []
                    tags += [f"params {', '.join(p['key'] for p in m['params'])}"] if m["params"] else []
                    lines.append(f"  {m['name']:<18} {'; '.join(tags)}")
            return "\n".join(lines)

        _emit(out, json_, human)


@modules_app.command("show")
def modules_show(name: Annotated[str, typer.Argument(help="A module name, or KIND.NAME (e.g. policy.random).")],
                 json_: JsonOpt = False):
    """One module (every module of that name, when two kinds share it)."""
    from curriculum import modules

    with _guard():
        found = [m.to_json() for m in modules.find(name)]
        _emit(found, json_, lambda r: "\n\n".join(_module_human(m) for m in r))


def main() -> None:
    # Offline by design: nothing is fetched from a hub at run time (README, DESIGN.md).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library progress bars (weight loading, dataset saving) are noise here; Nucleus shows its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("sentence_transformers", "transformers", "datasets", "httpx", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
