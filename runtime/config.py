"""Typed configuration: the schema every YAML file in conf/ and every command-line override fills.

The dataclasses are registered in Hydra's ConfigStore, so a typo (`generation.max_new_token=3`) or a
wrong type is an error before anything runs. YAML only fills values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ArchConfig:
    """Shape of a synthetic checkpoint; `null` keeps the real gpt-oss-20b value (runtime/assets)."""

    num_hidden_layers: int | None = None
    """Decoder layers (20b: 24, 120b: 36). Layer types alternate sliding/full attention."""
    num_local_experts: int | None = None
    """Experts per MoE layer (20b: 32, 120b: 128)."""
    num_experts_per_tok: int | None = None
    """Experts each token is routed to (gpt-oss: 4)."""
    hidden_size: int | None = None
    """Residual stream width (gpt-oss: 2880). Must be a multiple of 32 for MXFP4."""
    intermediate_size: int | None = None
    """Width of each expert's hidden layer (gpt-oss: 2880). Must be a multiple of 32 for MXFP4."""
    num_attention_heads: int | None = None
    """Query heads (gpt-oss: 64)."""
    num_key_value_heads: int | None = None
    """Key/value heads, shared by groups of query heads (gpt-oss: 8)."""
    head_dim: int | None = None
    """Width of one attention head (gpt-oss: 64)."""
    sliding_window: int | None = None
    """Tokens seen by the sliding-attention layers (gpt-oss: 128)."""


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short model name used in logs, records and synthetic-checkpoint cache keys."""
    path: str | None = None
    """Checkpoint: a local directory in the Hugging Face layout or a hub id (needs a reachable hub).
    Ignored when `synthetic` is true."""
    synthetic: bool = False
    """Use random weights in this model's real shape and format instead of `path` (written once to the
    cache directory by runtime.synth, then loaded through the real loading path)."""
    synthetic_format: str = "mxfp4"
    """Format of a synthetic checkpoint: `mxfp4` (experts as *_blocks/*_scales, as released) or `bf16`."""
    synthetic_seed: int = 0
    """Seed of the random synthetic weights."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    """Shape overrides for synthetic checkpoints."""
    dtype: str = "auto"
    """Compute dtype: `bfloat16`, `float16`, `float32`, or `auto` (bfloat16 on GPU, float32 on CPU)."""
    device: str = "auto"
    """`cuda`, `cpu` or `auto` (cuda when available). Under torchrun each rank takes cuda:LOCAL_RANK."""


@dataclass
class ParallelConfig:
    tp_size: int = 1
    """Tensor-parallel ranks: attention heads, the KV cache and each expert's hidden layer are split."""
    ep_size: int = 1
    """Expert-parallel ranks: the experts of each MoE layer are split into ep_size groups."""
    dp_size: int = 1
    """Data-parallel replicas, each running a disjoint slice of the prompts. tp*ep*dp = world size."""
    backend: str = "auto"
    """torch.distributed backend: `nccl`, `gloo`, or `auto` (nccl on GPU, gloo on CPU)."""
    all_reduce: str = "auto"
    """How the forward's sums over tp/ep ranks travel: `one_shot` (each rank reads its peers' parts
    from NVLink peer memory in one kernel: the lowest latency for decode-sized messages; GPUs of one
    node), `nccl`, or `auto` (one_shot where it works, else NCCL; gloo on the CPU). Larger messages
    (prefill) always go to NCCL. runtime/allreduce.py."""
    plan: str = "ours"
    """Who shards the model: `ours` (runtime/parallelize.py: TP attention, EP+TP experts, vocab-parallel
    embedding and lm_head, our kernels) or `transformers` (the published transformers recipe for
    gpt-oss on several GPUs: `from_pretrained(tp_plan="auto", distributed_config=
    DistributedConfig(enable_expert_parallel=True))` over all ranks, experts=grouped_mm, eager
    attention; dp_size must be 1), to compare the two on your own cluster."""


@dataclass
class AttentionConfig:
    implementation: str = "eager"
    """transformers attention implementation: `eager`, `flex_attention`, or a hub kernel id such as
    `kernels-community/vllm-flash-attn3` (needs a hub, or LOCAL_KERNELS / a filled HF_HUB_CACHE)."""
    hub_download: bool = False
    """Allow downloading a hub attention kernel. Off by default so an offline run fails fast."""


@dataclass
class ExpertsConfig:
    implementation: str = "grouped_mm"
    """Experts implementation. transformers': `grouped_mm` (default), `batched_mm`, `eager`; ours:
    `triton` (fused Triton MoE on bf16 weights, runtime/kernels/moe.py) and `mxfp4` (fused Triton MoE
    run straight from an MXFP4 checkpoint's 4-bit blocks and scales, dequantized in registers; the
    experts stay in 4.25 bits per weight in memory, runtime/kernels/moe_mxfp4.py; needs an MXFP4
    checkpoint, a GPU of compute capability >= 8.0 (the CPU runs its torch reference), and
    intermediate_size / tp_size a multiple of 32). With an MXFP4 checkpoint every other choice
    dequantizes the experts to the compute dtype at load."""
    dequantized_above_tokens: int | None = None
    """experts=mxfp4 only: steps of more than this many tokens (prefills, large decode batches) run the experts
    from a copy dequantized to the compute dtype at load, through experts=triton's kernel; smaller steps stay on
    the 4-bit weights. On an H200, with the register-operand 4-bit blocks (moe_mxfp4.REG_A_BLOCKS), the 4-bit
    kernel is faster up to 256 tokens a step and the bf16 one from 512 (gpt-oss-20b, one layer: 0.34 vs 0.47 ms
    at 64 tokens, 0.50 vs 0.52 at 256, 0.70 vs 0.59 at 512; docs/benchmarks.md), so 256 gives both; under tensor
    parallel (intermediate size per rank not a multiple of 64) the plain 4-bit blocks run, for which 128 was the
    crossing (0.40 vs 0.49 ms at 64 tokens, 0.66 vs 0.50 at 256). Costs the experts' bf16 size on each rank besides the 4-bit
    one (gpt-oss-20b: 38 GB; gpt-oss-120b's 229 GB fits no single GPU: the load stops with the numbers).
    null: off (4-bit weights only)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Most tokens generated per prompt (the stop token included)."""
    batch_size: int = 8
    """Sequences decoded together on each data-parallel replica (with continuous batching: the most that run
    at once; with static: the size of each round)."""
    batching: str = "auto"
    """runtime.generate and Engine.generate: `continuous` (every prompt queued at once; a row whose sequence
    ends takes the next prompt before the next step; needs kv_cache=static), `static` (rounds of batch_size
    prompts, left-padded, each round as long as its longest answer), `auto` (continuous unless
    kv_cache=dynamic). Outputs are the same either way in float32 greedy decoding."""
    max_prefill_tokens: int = 8192
    """Continuous batching: the most prompt tokens prefilled between two decode steps (chunked prefill: a
    longer prompt goes in pieces over several steps, its keys kept in its row, so running sequences wait
    for at most this many tokens of prefill per step). Static rounds (and runtime.bench's fixed rows): a round
    whose rows x prompt width exceeds it is prefilled in column chunks of at most this many tokens (one column
    at a time where the rows alone are more), so the forward's temporaries (the MoE's above all) stay bounded
    at any batch size."""
    async_scheduling: bool = False
    """Continuous batching (runtime.generate, the offline bench, the server): launch each decode step before the
    last one's tokens are read, so the host's planning and booking run while the GPU works instead of between
    steps. A sequence that ended is run one step more (that token is dropped); a preempted one draws its
    in-flight token again. Tokens are the same as without it (greedy). Off until timed on a GPU."""
    do_sample: bool = False
    """Sample with temperature/top_p; false is greedy decoding."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p (0 < top_p <= 1)."""
    seed: int = 0
    """Seed of the sampler. Data-parallel replica d draws with seed + d (so replicas do not repeat each
    other's samples); the tensor/expert-parallel ranks of a replica follow their leader's draws."""
    reasoning_effort: str = "medium"
    """Harmony reasoning effort for prompts that do not set their own: `low`, `medium` or `high`."""
    kv_cache: str = "static"
    """`static`: fixed KV buffers and GPU-side masks (runtime/graph_decode.py), the fast path;
    `dynamic`: transformers' DynamicCache and mask building, the reference."""
    cuda_graph: bool = True
    """With the static cache on a GPU: capture the decode step once as a CUDA graph and replay it."""
    compile: bool = False
    """With the static cache: torch.compile the decode step (fuses the small elementwise kernels;
    compiles once per batch shape, which takes a while) before it is captured."""
    combo_kernels: bool = True
    """With compile on a GPU: inductor also merges independent kernels of the step into one launch
    (torch._inductor's combo_kernels: e.g. RoPE and the KV-cache writes, three launches a layer, become
    one). The 120b's batch-1 TPOT on the H200: 3.02 ms without, 2.92 with (docs/benchmarks.md)."""


@dataclass
class PromptsConfig:
    path: str | None = None
    """JSONL file, one object per line: {"prompt": str} or {"messages": [{"role", "content"}...]},
    optional "id" and "reasoning_effort". When null, `texts` is used."""
    texts: list[str] = field(default_factory=list)
    """Inline prompts (one user message each), used when `path` is null."""
    developer: str | None = None
    """Developer instructions added to prompts that carry no system/developer message."""
    renderer: str = "harmony"
    """`harmony` (openai-harmony renders the prompt) or `chat_template` (the checkpoint's template)."""
    too_long: str = "error"
    """A prompt whose tokens plus generation.max_new_tokens exceed the model's positions, found before
    any weight is read: `error` (stop, naming the ids and lengths) or `record` (write a record with
    finish_reason "error" for it, in its place, and generate the others)."""


@dataclass
class OutputConfig:
    path: str = MISSING
    """JSONL written by rank 0, one record per prompt in input order. Re-running with the same path
    skips prompts already written. The run record goes beside it as <path>.run.json."""
    token_ids: bool = False
    """Also write `completion_ids` (the generated token ids) in each record."""


@dataclass
class GenerateJobConfig:
    """Root of `python -m runtime.generate` (conf/generate.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class Objectives:
    """Service-level objectives of the serving benchmark, in ms; null: no objective on that metric."""

    ttft: float | None = None
    """Time to first token."""
    tpot: float | None = None
    """Time per output token after the first."""
    e2el: float | None = None
    """End-to-end latency of a request."""


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    """Sequences decoded together per data-parallel replica; one measurement per value."""
    input_len: int = 1024
    """Prompt tokens per sequence (random token ids, fixed length) in `fixed` mode."""
    output_len: int = 128
    """Generated tokens per sequence, EOS ignored (as vLLM / TensorRT-LLM benchmark) in `fixed` mode."""
    mode: str = "fixed"
    """`fixed` (input_len/output_len, EOS ignored) or `replay` (the prompts config, harmony-rendered,
    generation.max_new_tokens, stopping at EOS), both in this process; `offline` (num_prompts prompts of
    drawn lengths, EOS ignored, all queued: continuous batching against static rounds at each batch size,
    runtime.generate's two modes, in this process); or `serve`: requests over HTTP to an
    OpenAI-compatible server (ours, started by the bench with this config's model and layout, or `url`), at
    each `concurrency` (runtime/loadgen.py)."""
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64])
    """serve mode: requests in flight at once, one measurement per value (the server's serve.max_batch is
    set to the largest)."""
    num_prompts: int | None = None
    """serve mode: requests per measurement; null: 4 x the concurrency, at least 8. offline mode: prompts in
    the workload; null: 4 x the largest batch size."""
    request_rate: float | None = None
    """serve mode: requests sent per second (Poisson arrivals), still at most `concurrency` at once; null:
    all at once."""
    range_ratio: float = 0.0
    """serve and offline modes: prompt and output lengths drawn uniformly from [len x (1 - r), len x (1 + r)];
    0: fixed."""
    prefix_len: int = 0
    """serve mode: every prompt starts with the same prefix_len random tokens (a shared document or system
    prompt) before its own input_len: what a prefix cache saves shows in TTFT, and each point reports the
    cached prompt tokens the server's usage counted."""
    url: str | None = None
    """serve mode: the base URL of a running OpenAI-compatible server (http://host:port/v1) to measure
    instead of starting ours; its key from $OPENAI_API_KEY; describe its layout with parallel.* so tokens/s
    per GPU are right."""
    served_model: str | None = None
    """serve mode: the model id requests name; null: the first of GET /v1/models."""
    client_processes: int = 1
    """serve mode: client processes that share each point's requests (and its concurrency and rate), for servers
    faster than one Python process can read token by token (one read 512 streams at 15,400 tok/s on a 2-core
    machine with every ITL at the server's pace; several GPUs' worth of tokens needs more)."""
    goodput: Objectives = field(default_factory=lambda: Objectives())
    """serve mode: service-level objectives (e.g. bench.goodput.ttft=500 bench.goodput.tpot=50); goodput =
    requests per second that met every objective set. None set: not computed."""
    warmup: int = 2
    """Untimed runs per batch size before the timed ones (compilation, autotuning, allocator; a small
    prefill is captured as a CUDA graph the second time its shape comes, so 2 reach the steady state)."""
    repetitions: int = 3
    """Timed runs per batch size; medians and percentiles are taken over them."""
    baseline: bool = False
    """Also run the seed recipe in this process on the same weights: transformers from_pretrained() +
    generate() with defaults (under torchrun the published multi-GPU recipe: DistributedConfig(tp_plan="auto",
    enable_expert_parallel=ep_size > 1)); report our/baseline ratios."""
    baseline_repetitions: int = 1
    """Timed runs per batch size for the (slow) baseline."""
    out_dir: str | None = None
    """Directory for results.json, results.csv and the plots; null: beside `table`, named
    <time>-<model>-tp<t>ep<e>dp<d>."""
    table: str = "outputs/bench/results.csv"
    """A results table every run appends its rows to (the Pareto plot is drawn from it too)."""
    plots: bool = True
    """Draw throughput-per-GPU vs tokens/s-per-user and latency-vs-batch PNGs."""
    seed: int = 0
    """Seed of the random prompts."""
    profile: bool = False
    """After each batch size's timed runs, run it once more under torch.profiler and write the GPU
    kernels by total time (prefill alone, and the whole run) to <out_dir>/profile-b<batch>.txt."""
    spawn: bool = True
    """Started as one process with tp*ep*dp > 1: re-run itself under torchrun with that many ranks."""


@dataclass
class BenchJobConfig(GenerateJobConfig):
    """Root of `python -m runtime.bench` (conf/bench.yaml): the generate job's groups plus `bench`."""

    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class SynthConfig:
    out: str = MISSING
    """Directory to write the synthetic checkpoint into (created; must be empty or absent)."""
    format: str = "mxfp4"
    """`mxfp4` (experts as *_blocks/*_scales uint8, like the release) or `bf16`."""
    seed: int = 0
    """Seed of the random weights."""
    max_shard_bytes: int = 4_000_000_000
    """Largest safetensors shard written, in bytes."""


@dataclass
class SynthJobConfig:
    """Root of `python -m runtime.synth` (conf/synth.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP server binds on rank 0. 127.0.0.1 answers this machine only; 0.0.0.0 every
    interface (then set an api_key)."""
    port: int = 8000
    """TCP port of the HTTP server; 0 picks a free one (written to <out_dir>/endpoint.json)."""
    api_key: str | None = None
    """Key clients must send as `Authorization: Bearer KEY` on every route but /health; null reads
    $GPTOSS_API_KEY, and no key at all means no check. Prefer the variable: a command line shows in `ps`.
    Never written to the saved config."""
    model_name: str | None = None
    """Model id served at /v1/models and expected in requests' `model`; null uses model.name."""
    max_batch: int = 32
    """Requests decoded together (rows of the batch); more wait in a queue and join as rows and KV-cache blocks
    free up."""
    gpu_memory_utilization: float | None = None
    """Fraction of each GPU's memory the server may hold (weights, KV cache, activations), as vLLM's flag: the
    paged KV cache then gets as many blocks of 16 tokens as fit after the weights (the fewest any rank fits),
    and the start log says how many tokens it holds. null: kv_cache_tokens, else max_batch x max_len tokens."""
    kv_cache_tokens: int | None = None
    """Tokens the paged KV cache holds on every rank (rounded up to blocks of 16), shared by the running requests
    as they grow: fewer than max_batch x max_len lets more requests run than a full reservation would, and
    when the blocks run out the newest request is preempted and recomputed later (none fails). null: max_batch x
    max_len (or gpu_memory_utilization's; setting both is refused). At least max_len."""
    max_len: int = 8192
    """Tokens per request, prompt and answer together (a row's block table). Longer prompts, or a max_tokens
    beyond what is left, get a 400."""
    max_prefill_tokens: int = 8192
    """Most prompt tokens prefilled between two decode steps (chunked prefill): a longer prompt goes in
    pieces over several steps while the running streams keep decoding, so none waits for more than this
    many tokens of prefill per step."""
    max_waiting: int = 1024
    """Requests that may wait for a free row; beyond it new requests get 503."""
    prefix_cache: bool = True
    """Full KV-cache blocks (16 tokens) are found again by their content and everything before it: a request whose
    prompt starts with blocks in the cache (a system message, an earlier turn of the conversation) computes only
    the rest, and its usage reports them as cached_tokens; blocks of ended requests stay findable until their
    room is needed. false: every prompt is computed whole."""
    max_connections: int = 1024
    """HTTP connections served at once (a thread each); a connection beyond it gets 503 and is closed."""
    timeout_seconds: float = 60.0
    """Seconds a socket read or write may block before its connection is closed: a client stalled
    mid-request, an idle keep-alive connection, a stream nobody reads (its request is cancelled)."""
    stats_seconds: float = 10.0
    """Every this many seconds with work done, rank 0 logs where the serving loop's time went: decode steps and
    their ms (GPU wait vs host), prefill and idle shares, generated and prompt tok/s, running and waiting
    requests, KV-cache use, the stream writer's busy share. 0: no such lines."""
    out_dir: str = "outputs/serve/${now:%Y-%m-%d_%H-%M-%S}"
    """Directory rank 0 writes config.yaml (the resolved config, without the API key) and endpoint.json
    (URL, host, port; written once the model is loaded and requests are answered) into."""


@dataclass
class ServeJobConfig:
    """Root of `torchrun -m runtime.serve` (conf/serve.yaml). `generation` gives the defaults of requests
    that leave temperature / top_p / reasoning effort out, the sampler seed, and cuda_graph / compile for
    the decode step; its max_new_tokens and batch_size are the generate job's (serve.max_len and
    serve.max_batch apply here)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


ROOTS: dict[str, type] = {"generate": GenerateJobConfig, "synth": SynthJobConfig, "bench": BenchJobConfig,
                          "serve": ServeJobConfig}


def register() -> None:
    """Make the schemas known to Hydra; conf/*.yaml name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="generate_schema", node=GenerateJobConfig)
    cs.store(name="synth_schema", node=SynthJobConfig)
    cs.store(name="bench_schema", node=BenchJobConfig)
    cs.store(name="serve_schema", node=ServeJobConfig)


register()


def compose(config_name: str = "generate", overrides: list[str] | None = None) -> DictConfig:
    """Compose a job config outside a Hydra entry point (notebooks, tests): same rules as the CLI."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    # `${now:...}` in output paths must resolve while Hydra's resolvers are still registered.
    OmegaConf.resolve(cfg)
    check_schema(cfg, ROOTS[config_name])
    return cfg


def check_schema(cfg: DictConfig, schema: type) -> None:
    """Refuse keys the schema does not have, including ones added with Hydra's `+key=value`."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    from runtime.errors import UserError

    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg, resolve=True))
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, "full_key", "") or ""
        reason = str(e.msg).splitlines()[0]
        raise UserError(f"config key {key!r} is not valid ({reason}): the fields are in runtime/config.py") from e


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, for run records."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
