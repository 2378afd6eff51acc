// train_gpt.rs: the speedrun. A ~30M GPT on GPT-2 tokens of real data, raced to a validation loss with ordinary
// causal attention or the Tauformer's topological ("tau") attention, over libtorch (tch). Read top to bottom:
// set-up, data, Laplacian, kernels, model, optimizer, several GPUs, logs, training, checkpoints, main.
// Every log embeds this file and what builds it (EMBEDDED_FILES); records tooling is in tools.rs, tests under tests/.

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

mod tools;

const SOURCE: &str = include_str!("train_gpt.rs");
// Every log embeds these after SOURCE, so that `train_gpt source LOG` gives back a tree that builds the run's binary:
// the kernels, then tools.rs (records tooling, not the speedrun, but `mod tools` needs it to compile), then the build:
// pinned crates, build script, libtorch location, set-up.
const EMBEDDED_FILES: &[(&str, &str)] = &[
    ("kernels/ext.cpp", include_str!("kernels/ext.cpp")),
    ("kernels/tau_attn.cu", include_str!("kernels/tau_attn.cu")),
    ("kernels/softcap_ce.cu", include_str!("kernels/softcap_ce.cu")),
    ("kernels/block_ops.cu", include_str!("kernels/block_ops.cu")),
    ("kernels/tau_bias.cu", include_str!("kernels/tau_bias.cu")),
    ("kernels/mma_bf16.cuh", include_str!("kernels/mma_bf16.cuh")),
    ("kernels/launchers.h", include_str!("kernels/launchers.h")),
    ("tools.rs", include_str!("tools.rs")),
    ("Cargo.toml", include_str!("Cargo.toml")),
    ("Cargo.lock", include_str!("Cargo.lock")),
    ("build.rs", include_str!("build.rs")),
    (".cargo/config.toml", include_str!(".cargo/config.toml")),
    ("run.sh", include_str!("run.sh")),
];
const SHARD_MAGIC: i32 = 20240520; // modded-nanogpt / llm.c token shard
const SHARD_VERSION: i32 = 1;
const HEADER_INTS: usize = 256;
const SHARD_MAX_TOKENS: usize = 100_000_000;
const EOT: u16 = 50256; // <|endoftext|>, prepended to every document (it doubles as BOS)
const GPT2_VOCAB: i64 = 50257; // ids past it are padding of the embedding table, never sampled
const VAL_FRACTION: f64 = 0.05; // plain-text corpora: the last 5% of each file, cut at a blank line
const LAMBDA_EPS: f64 = 1e-6; // E(x) = xᵀLx / (xᵀx + ε)
const ROPE_BASE: f64 = 10000.0;
const SOFTCAP: f64 = 15.0;
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315); // Muon's quintic Newton–Schulz
const H100_BF16_PEAK: f64 = 989e12; // dense bf16 FLOP/s of H100/H200 SXM (llm.c's table); MFU denominator
const FUSED_HEAD_DIMS: [i64; 3] = [32, 64, 128]; // the head dims kernels/tau_attn.cu is instantiated for
const F32_TAU_CHUNK: i64 = 256; // query rows a chunk of fp32 tau attention under --kernels fused (the kernel is bf16)
                                // --kernels fused with --head-chunk 0: rows of B·T a cross-entropy kernel call takes.
                                // Bounds the bf16 logits to 1.6 GB at V 50304 (6.6 GB for all 64×1024 rows at once)
                                // while each of the 4 matmuls of a step stays large.
const FUSED_LOGIT_ROWS: i64 = 16384;
// libtorch's rms_norm default for fp32 and bf16 alike (its fp32 opmath), which the fused kernels repeat
const RMS_EPS: f64 = f32::EPSILON as f64;
// bench --profile: enough to see a steady step between two others
const PROFILE_STEPS: i64 = 3;
// Nats of val loss above its step-0 value at which a run has diverged (finite, as the logits are soft-capped): the
// first steps at a high learning rate may rise a few tenths, a diverged run rises by many (10.8 to 24.3 at lr 1e9).
const DIVERGED_BY: f64 = 1.0;
const MAX_SEQ_LEN: i64 = 1 << 20; // a checkpoint's seq_len sizes its RoPE tables: bounded before they are made

// --------------------------------------------------------------------------------------------------------------------
// Set-up: command line, presets, devices

#[derive(Parser)]
#[command(name = "train_gpt", about = "NanoGPT-speedrun harness: causal vs topological (tau) attention")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model and write logs/<uuid>.txt (a repeated option: the last one wins)
    #[command(args_override_self = true)]
    Train(TrainArgs),
    /// Tokenize JSON Lines ({"path","split","text"}; plain, .zst, .gz) or a folder/file of plain text into GPT-2 shards
    Prepare(PrepareArgs),
    /// Generate text from a checkpoint written by --save-checkpoint
    Sample(SampleArgs),
    /// Mean ± σ of final val loss and time, and the one-sided t-test against the target (H0: mean ≥ target)
    Stats {
        logs: Vec<PathBuf>,
        /// Also compare with these runs (e.g. another variant): Welch's two-sided t-test of final val loss and time
        #[arg(long, num_args = 1..)]
        vs: Vec<PathBuf>,
    },
    /// Race attention variants: seeds 0..N of each, interleaved, each a `train` run of this executable with the
    /// train options given (--nproc too; the race sets --attn, --seed, --log-dir), into one folder; then a report
    /// (each variant's runs, time-to-target, final val loss, ms/step, Welch's t-test against the first variant, the
    /// winner) in DIR/race.txt and the curves in DIR/race.svg. A rerun with the same --out skips the runs whose whole
    /// log is there with the same config
    #[command(args_override_self = true)]
    Race(RaceArgs),
    /// Rerun a log or a record folder's logs (its seeds, the options of its config) with this build, and report the
    /// new runs against the original: final val loss and Welch's test, time-to-target, the largest val-loss gap
    /// between the mean curves, a verdict. Refused when the log's train_gpt.rs is not this build's, unless
    /// --allow-source-diff
    Reproduce {
        /// A log (.txt, .txt.gz) or a record folder of logs of one config
        log: PathBuf,
        /// Rerun the record's first N seeds (one log: seeds 0..N) instead of its seeds
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        seeds: Option<i64>,
        /// Logs and reproduce.txt go here (default logs/reproduce-<date>-<time>); a rerun with the same DIR skips the
        /// runs it holds
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Rerun even though the log's train_gpt.rs differs from this build's (the report says so)
        #[arg(long)]
        allow_source_diff: bool,
    },
    /// Write the source tree a log embeds (train_gpt.rs, kernels, tools.rs, Cargo.toml, Cargo.lock, build.rs, run.sh)
    /// into DIR, new or empty; `cd DIR && ./run.sh setup` builds the run's binary
    Source {
        log: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Differences between two runs: options, embedded source, val loss at matched steps, speed, memory
    Diff { a: PathBuf, b: PathBuf },
    /// Val loss against training time and step, as SVG: one line a log (labelled by record folder or variant, and
    /// seed), or, for the logs of one record folder, their mean with a min–max band; dashed: the target
    Plot {
        logs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Plot the train loss of every step instead of the val loss
        #[arg(long)]
        train: bool,
    },
    /// Loss curves as data: one row a step (log, record, variant, seed, step, train_loss, val_loss, train_time_ms; a
    /// cell is empty where a step has no such value) as CSV, or one object a log with its points as JSON
    Curves {
        logs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "csv")]
        format: CurveFormat,
    },
    /// The README records table, recomputed from the logs under ROOT (default records/)
    RecordsTable {
        #[arg(default_value = "records")]
        root: PathBuf,
        /// Only each track's current records (the README's table)
        #[arg(long)]
        current: bool,
    },
    /// Time training steps on random tokens: ms/step, tokens/s, MFU, peak memory per variant, as JSON
    #[command(args_override_self = true)]
    Bench(BenchArgs),
    /// Time cached greedy decoding of checkpoints: tokens/s, time per token against position, cache bytes, as JSON
    BenchDecode(BenchDecodeArgs),
    /// Start --nproc ranks that meet (TCPStore rendezvous) and pass a barrier; --fail-rank R makes rank R die first
    DistCheck(DistCheckArgs),
    /// Exit 0 when a CUDA device is usable, 1 otherwise (for scripts)
    HasCuda,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum CurveFormat {
    Csv,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Preset {
    /// speedrun on CUDA, tiny on CPU
    Auto,
    /// the 30M linux-c recipe (every default below)
    Speedrun,
    /// a small model on the embedded tiny corpus, minutes on a 2-core CPU: --data data/tokens/tiny --n-layer 4
    /// --n-head 4 --n-embd 128 --seq-len 64 --batch-size 8 --steps 200 --warmup-steps 20 --val-every 25 --val-tokens
    /// 4096 --target-val-loss 6.5 --sample-tokens 48 --lap-tokens 1000000 --lap-k 1024, each unless given
    Tiny,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Kernels {
    /// fused on CUDA; plain on the CPU, with --tau-chunk, or at a head dim the kernels are not built for
    Auto,
    /// libtorch ops only: the reference path (tau attention, norms, RoPE, the head's cross-entropy)
    Plain,
    /// CUDA kernels (CUDA only): tau attention (kernels/tau_attn.cu, scores never stored), the soft-capped
    /// cross-entropy over the bf16 logits (kernels/softcap_ce.cu), norms, RoPE + QK-norm, ReLU² (kernels/block_ops.cu),
    /// tau-bias's prior (kernels/tau_bias.cu)
    Fused,
}

// Serialized as the log's config and a checkpoint's options (which --resume reads back).
#[derive(clap::Args, Clone, Serialize, serde::Deserialize, Debug)]
struct TrainArgs {
    /// Shard folder made by `train_gpt prepare`
    #[arg(long, default_value = "data/tokens/linux-c")]
    data: PathBuf,
    /// The recipe. The defaults shown below are the speedrun's: tiny (auto's pick on a CPU) replaces those it lists
    #[arg(long, value_enum, default_value = "auto")]
    preset: Preset,
    /// The attention variant (one `impl Attention` in the model section)
    #[arg(long, default_value = "causal", value_parser = attention_values())]
    attn: String,
    #[arg(long, default_value = "auto", help = "auto|cpu|cuda|cuda:N")]
    device: String,
    #[arg(long, default_value_t = 6)]
    n_layer: i64,
    #[arg(long, default_value_t = 6)]
    n_head: i64,
    /// Key/value heads, fewer for grouped-query attention (0: as many as --n-head)
    #[arg(long, default_value_t = 0)]
    n_kv_head: i64,
    #[arg(long, default_value_t = 384)]
    n_embd: i64,
    #[arg(long, default_value_t = 1024)]
    seq_len: i64,
    /// GPT-2's 50257 padded to a multiple of 128
    #[arg(long, default_value_t = 50304)]
    vocab_size: i64,
    /// Sequences a step (tokens a step = batch_size × seq_len)
    #[arg(long, default_value_t = 64)]
    batch_size: i64,
    #[arg(long, default_value_t = 1200)]
    steps: i64,
    #[arg(long, default_value_t = 50)]
    warmup_steps: i64,
    /// Linear cool-down to 0 over this last fraction of steps
    #[arg(long, default_value_t = 0.4)]
    cooldown_frac: f64,
    #[arg(long, default_value_t = 0.02)]
    lr_muon: f64,
    #[arg(long, default_value_t = 0.95)]
    muon_momentum: f64,
    #[arg(long, default_value_t = 5)]
    ns_steps: i64,
    #[arg(long, default_value_t = 0.008)]
    lr_adam: f64,
    #[arg(long, default_value_t = 0.8)]
    adam_beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    adam_beta2: f64,
    #[arg(long, default_value_t = 1e-10)]
    adam_eps: f64,
    #[arg(long, default_value_t = 100)]
    val_every: i64,
    /// Validate on at most this many val tokens (0: the whole val split)
    #[arg(long, default_value_t = 0)]
    val_tokens: i64,
    /// Time-to-target is the training time at the first validation at or under this loss
    #[arg(long, default_value_t = 2.0)]
    target_val_loss: f64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// bf16 compute with fp32 master weights (auto: bf16 on CUDA, f32 on CPU)
    #[arg(long, default_value = "auto", help = "auto|bf16|f32")]
    dtype: String,
    /// tau: fixed temperature of the logits −|λq−λk|/temperature
    #[arg(long, default_value_t = 1.0)]
    tau_temp: f64,
    /// tau-lt, tau-full, tau-multi: initial inverse temperature of every head (learned); tau-bias: initial α
    #[arg(long, default_value_t = 20.0)]
    inv_temp_init: f64,
    /// sliding: keys a query sees, itself included
    #[arg(long, default_value_t = 256)]
    window: i64,
    /// tau-multi: spectral bands of L, one energy (and one τ) each
    #[arg(long, default_value_t = 4)]
    bands: i64,
    /// tau: fix τ by hand instead of calibrating it (median E of block-0 keys on the first batch)
    #[arg(long)]
    tau: Option<f64>,
    /// tau: where L comes from: corpus | chain | file:PATH (.npy or .safetensors, F×F)
    #[arg(long, default_value = "corpus")]
    laplacian: String,
    /// corpus Laplacian: co-occurrence window ±w
    #[arg(long, default_value_t = 4)]
    lap_window: usize,
    /// corpus Laplacian: training tokens read
    #[arg(long, default_value_t = 10_000_000)]
    lap_tokens: usize,
    /// corpus Laplacian: most frequent tokens kept as items
    #[arg(long, default_value_t = 4096)]
    lap_k: usize,
    #[arg(long, default_value_t = 1.31)]
    lap_eps: f64,
    #[arg(long, default_value_t = 15)]
    lap_topk: usize,
    #[arg(long, default_value_t = 1.8)]
    lap_p: f64,
    #[arg(long, default_value_t = 0.535)]
    lap_sigma: f64,
    /// Processes (GPUs) on this host, one rank each (torchrun's RANK/WORLD_SIZE/... start ranks across hosts instead)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=1024))]
    nproc: i64,
    /// Sequences a rank runs at once; gradients accumulate over batch_size / (ranks × micro_batch) of them (0: all its
    /// rows)
    #[arg(long, default_value_t = 0)]
    micro_batch: i64,
    /// Seconds a rank waits for the others (rendezvous, all-reduce) before it fails
    #[arg(long, default_value_t = 60.0)]
    dist_timeout: f64,
    /// tau: attention this many query rows at a time, scores recomputed in the backward (0: all T×T scores at once)
    #[arg(long, default_value_t = 0)]
    tau_chunk: i64,
    /// Libtorch ops (plain, the reference path) or the CUDA kernels (fused, the fast path); logged as resolved
    #[arg(long, value_enum, default_value = "auto")]
    kernels: Kernels,
    /// Run the tied head and its gradient this many rows at a time (0: plain autograd over all B·T rows at once; under
    /// --kernels fused a fixed chunk that bounds the bf16 logits)
    #[arg(long, default_value_t = 0)]
    head_chunk: i64,
    /// CPU path: libtorch's intra-op threads (0: one; on a shared 2-core box one thread runs the tiny preset at
    /// 0.50–0.55 s/step where two run 0.26 s idle but up to 3.2 s while another process takes a core). Logged as
    /// resolved; CUDA runs keep libtorch's default
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1024))]
    threads: i64,
    /// Write the final weights as safetensors (names in the README); never over a file unless --overwrite
    #[arg(long)]
    save_checkpoint: Option<PathBuf>,
    /// Let --save-checkpoint replace the file it names
    #[arg(long)]
    #[serde(skip)]
    overwrite: bool,
    /// Every N steps (and on SIGINT/SIGTERM) write what --resume needs into --checkpoint-dir (0: never)
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    checkpoint_every: i64,
    /// Folder of one run's checkpoints, step_NNNNNN/ each (see docs/checkpoints.md)
    #[arg(long, default_value = "checkpoints")]
    checkpoint_dir: PathBuf,
    /// Checkpoints kept in --checkpoint-dir, the newest
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i64).range(1..))]
    keep_checkpoints: i64,
    /// Continue a run from a checkpoint: a step_NNNNNN folder, or a --checkpoint-dir (its newest). Options left out
    /// are the run's; of those given, only --steps, --val-every, --target-val-loss, --log-dir, --checkpoint-*,
    /// --keep-checkpoints, --save-checkpoint, --sample-tokens, --threads and --dist-timeout may differ
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Tokens of a sample (temperature 0.8, top-k 50) printed and logged at the end (0: none)
    #[arg(long, default_value_t = 0)]
    sample_tokens: i64,
    #[arg(long, default_value = "logs")]
    log_dir: PathBuf,
    /// Print the config line this run would log (every option resolved) and exit before training; `race` and
    /// `reproduce` find the runs their folder already holds with it
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
}

#[derive(clap::Args)]
struct RaceArgs {
    /// Two or more --attn values; each is tested against the first
    #[arg(required = true, num_args = 2..)]
    variants: Vec<String>,
    /// Seeds 0..N of each variant, interleaved: seed 0 of each, then seed 1, ...
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i64).range(1..))]
    seeds: i64,
    /// The race's folder: its logs, race.txt, race.svg (default logs/race-<date>-<time>)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    // every run's options; those given are passed on (train_argv), but --attn, --seed, --log-dir (cmd_race)
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// A .jsonl, .jsonl.zst or .jsonl.gz file, a .txt (.zst, .gz) file, or a folder of .txt files
    input: PathBuf,
    /// Output folder for train_NNNNNN.bin / val_NNNNNN.bin: a new or empty one (written whole, then renamed)
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Variants to time, comma-separated (tau runs use the chain L: its values do not change the cost)
    #[arg(long, default_value = "causal,tau,tau-lt", value_delimiter = ',', value_parser = attention_values())]
    variants: Vec<String>,
    #[arg(long, default_value_t = 20)]
    bench_steps: i64,
    /// Untimed steps first (allocator and cuDNN/cuBLAS warm-up)
    #[arg(long, default_value_t = 5)]
    bench_warmup: i64,
    /// Also write the JSON list here
    #[arg(long)]
    out: Option<PathBuf>,
    /// Then profile PROFILE_STEPS more steps (torch.profiler's Kineto: CPU ops, CUDA kernels) into
    /// DIR/<variant>_rank<r>.json, Chrome traces that Perfetto opens
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args)]
struct BenchDecodeArgs {
    /// Checkpoints written by --save-checkpoint, e.g. one per variant
    #[arg(long, required = true, num_args = 1..)]
    checkpoint: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "128")]
    prompt_lens: Vec<i64>,
    /// Tokens generated; past the trained context the model runs on with a longer RoPE table (cost only)
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    gen_lens: Vec<i64>,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch_sizes: Vec<i64>,
    /// Timed repeats of each shape; every figure is their median
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// fused: tau attention of the decoding steps through kernels/tau_attn.cu (CUDA only)
    #[arg(long, value_enum, default_value_t = Kernels::Auto)]
    kernels: Kernels,
    /// Also write the JSON list here
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DistCheckArgs {
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i64).range(1..=1024))]
    nproc: i64,
    #[arg(long)]
    fail_rank: Option<i64>,
    #[arg(long, default_value_t = 60.0)]
    dist_timeout: f64,
}

#[derive(clap::Args)]
struct SampleArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    tokens: i64,
    /// 0: greedy
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 50)]
    top_k: i64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Re-run the whole context for every token instead of caching keys (K or λk) and values
    #[arg(long)]
    no_cache: bool,
    /// fused: tau attention through kernels/tau_attn.cu (CUDA only)
    #[arg(long, value_enum, default_value_t = Kernels::Auto)]
    kernels: Kernels,
}

// The tiny preset: what a 2-core CPU trains in about two minutes. Explicit flags still win.
fn apply_preset(a: &mut TrainArgs, m: &ArgMatches, cuda: bool) {
    if a.preset == Preset::Auto {
        a.preset = if cuda { Preset::Speedrun } else { Preset::Tiny };
    }
    if a.preset != Preset::Tiny {
        return;
    }
    let default = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::DefaultValue);
    macro_rules! tiny {
        ($($field:ident = $v:expr),*) => { $( if default(stringify!($field)) { a.$field = $v; } )* };
    }
    tiny!(
        data = PathBuf::from("data/tokens/tiny"),
        n_layer = 4,
        n_head = 4,
        n_embd = 128,
        seq_len = 64,
        batch_size = 8,
        steps = 200,
        warmup_steps = 20,
        val_every = 25,
        val_tokens = 4096,
        target_val_loss = 6.5,
        sample_tokens = 48,
        lap_tokens = 1_000_000,
        lap_k = 1024
    );
}

// The CPU path: `threads` intra-op threads (0: one: libtorch's one a core collapses as soon as another process takes
// a core), and a heap that keeps its pages: glibc otherwise maps each large tensor (the tiny preset's 100 MB logits)
// fresh and unmaps it on free, 12M page faults and half the time in the kernel over 40 steps. The heap changes no
// number; the thread count only float rounding (tiny preset, 200 steps, one thread against two: every val loss and
// the sample equal, one train loss of 200 off by 1e-4 in the last logged digit). CUDA runs keep libtorch's and glibc's
// defaults. Returns the threads in use, as logged.
fn set_up_cpu(threads: i64, dev: Device) -> i64 {
    if !dev.is_cuda() {
        tch::set_num_threads(threads.max(1) as i32);
        // no mmap for large blocks, and no trimming of the heap's top below 2 GiB
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
    tch::get_num_threads() as i64
}

// One-line errors from here down: Result<_, String> carries "what is wrong; how to fix it".
type Res<T> = Result<T, String>;

fn pick_device(spec: &str) -> Res<Device> {
    let cuda = tch::Cuda::is_available();
    match spec {
        "auto" => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let i: i64 = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| format!("--device {s}: bad index; use cuda or cuda:N"))?;
            if !cuda {
                return Err(format!(
                    "--device {s}: no CUDA device is usable here; pass --device cpu, or run on a GPU \
                    box with LD_LIBRARY_PATH=<torch>/lib"
                ));
            }
            if i >= tch::Cuda::device_count() {
                return Err(format!("--device {s}: only {} CUDA device(s); pick cuda:0..", tch::Cuda::device_count()));
            }
            // made current, as torch.cuda.set_device: otherwise every op on cuda:N switches devices and back, custom
            // kernels would look up device 0's stream, and rank N would also hold a context on GPU 0
            unsafe { ext::tg_set_device(i as i32) };
            Ok(Device::Cuda(i as usize))
        }
        s => Err(format!("--device {s}: unknown device; use auto, cpu, cuda or cuda:N")),
    }
}

// CUDA exists for libtorch once libtorch_cuda.so is loaded. The c10d code links it, but a build that drops it
// (tch links as-needed) would see no GPU, so load it, and the CUDA linear algebra beside it, by hand.
fn load_cuda_runtime() {
    for lib in ["libtorch_cuda.so\0", "libtorch_cuda_linalg.so\0"] {
        unsafe { libc::dlopen(lib.as_ptr() as *const libc::c_char, libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    }
}

fn compute_kind(spec: &str, dev: Device) -> Res<Kind> {
    match spec {
        "auto" => Ok(if dev.is_cuda() { Kind::BFloat16 } else { Kind::Float }),
        "bf16" => Ok(Kind::BFloat16),
        "f32" => Ok(Kind::Float),
        s => Err(format!("--dtype {s}: unknown; use auto, bf16 or f32")),
    }
}

// --kernels auto|plain|fused → plain or fused. Fused is one way of running tau attention (not with --tau-chunk), on
// CUDA, at a head dim the kernels are built for; auto takes it wherever it can, so a GPU runs the fast path by default.
fn resolve_kernels(kernels: Kernels, tau_chunk: i64, dev: Device, d: i64) -> Res<Kernels> {
    let fits = dev.is_cuda() && tau_chunk == 0 && FUSED_HEAD_DIMS.contains(&d);
    match kernels {
        Kernels::Auto => Ok(if fits { Kernels::Fused } else { Kernels::Plain }),
        Kernels::Plain => Ok(Kernels::Plain),
        Kernels::Fused if tau_chunk > 0 => {
            Err("--kernels fused and --tau-chunk are two ways to run tau attention; pass one of them".into())
        }
        Kernels::Fused if !dev.is_cuda() => {
            Err(format!("--kernels fused needs CUDA (the device is {dev:?}); pass --kernels plain"))
        }
        Kernels::Fused if !fits => Err(format!(
            "--kernels fused: head dim {d} (--n-embd / --n-head) is not one of {FUSED_HEAD_DIMS:?}; \
            pass --kernels plain"
        )),
        Kernels::Fused => Ok(Kernels::Fused),
    }
}

// Several ranks take cuda:LOCAL_RANK each (NCCL needs a GPU a rank): only --device auto or cuda, where CUDA is.
// Checked by the launcher before it starts any rank, and by each rank (torchrun's variables skip the launcher).
fn ranks_device_error(spec: &str, world: i64) -> Option<String> {
    let why = if !matches!(spec, "auto" | "cuda") {
        format!("--device {spec} names one device for all of them")
    } else if !tch::Cuda::is_available() {
        "no CUDA device is usable here".to_string()
    } else {
        return None;
    };
    Some(format!(
        "running on {world} ranks needs a CUDA GPU each (NCCL, cuda:LOCAL_RANK a rank), but {why}; on CPU use \
        --nproc 1, on a GPU box --device auto"
    ))
}

// A rank's device: cuda:LOCAL_RANK under several ranks, else --device.
fn rank_device(de: &Option<DistEnv>, spec: &str) -> Res<Device> {
    match de {
        Some(e) => match ranks_device_error(spec, e.world) {
            Some(err) => Err(format!("rank {}: {err}", e.rank)),
            None => pick_device(&format!("cuda:{}", e.local_rank)),
        },
        None => pick_device(spec),
    }
}

fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

// --------------------------------------------------------------------------------------------------------------------
// Data: GPT-2 token shards (256×int32 header: magic, version, n_tokens; then uint16 tokens)

fn tokenizer() -> tiktoken_rs::CoreBPE {
    tiktoken_rs::r50k_base().expect("tiktoken-rs embeds the r50k (GPT-2) ranks")
}

// Documents as (split, text). JSON Lines keep their split; plain text gets a deterministic held-out tail.
fn read_documents(input: &Path) -> Res<Vec<(String, String)>> {
    let name = input.to_string_lossy().to_string();
    if input.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(input)
            .map_err(|e| format!("{name}: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!(
                "{name}: no .txt files in this folder; pass a folder of .txt files or a .jsonl(.zst) file"
            ));
        }
        let mut docs = vec![];
        for f in files {
            docs.extend(read_documents(&f)?);
        }
        return Ok(docs);
    }
    // what a file holds by its name: anything else (a .json array, a .csv) would be tokenized as if it were prose
    const KINDS: [&str; 6] = [".jsonl", ".jsonl.zst", ".jsonl.gz", ".txt", ".txt.zst", ".txt.gz"];
    if !KINDS.iter().any(|k| name.ends_with(k)) {
        return Err(format!(
            "{name}: not a kind of file prepare reads; pass {} (JSON Lines or plain text, plain or compressed), or \
            a folder of .txt files",
            KINDS.join(", ")
        ));
    }
    let mut raw = vec![];
    let file = fs::File::open(input).map_err(|e| format!("{name}: {e}; check the path"))?;
    let read = if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut raw))
    } else if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(file).read_to_end(&mut raw)
    } else {
        std::io::BufReader::new(file).read_to_end(&mut raw)
    };
    read.map_err(|e| format!("{name}: cannot read it ({e}); the file is corrupt or not what its name says"))?;
    // Non-UTF-8 bytes become U+FFFD rather than failing the whole corpus.
    let text = String::from_utf8_lossy(&raw).into_owned();
    if KINDS[..3].iter().any(|k| name.ends_with(k)) {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l).map_err(|e| {
                    format!("{name}:{}: bad JSON ({e}); each line must be {{\"path\",\"split\",\"text\"}}", i + 1)
                })?;
                let split = v["split"].as_str().unwrap_or("train");
                let body = v["text"].as_str().ok_or(format!(
                    "{name}:{}: no \"text\" string; each line must be {{\"path\",\"split\",\"text\"}}",
                    i + 1
                ))?;
                if split != "train" && split != "val" {
                    return Err(format!("{name}:{}: split {split:?}; use \"train\" or \"val\"", i + 1));
                }
                Ok((split.to_string(), body.to_string()))
            })
            .collect();
    }
    let (train, val) = split_held_out(&text);
    Ok(vec![("train".into(), train.to_string()), ("val".into(), val.to_string())])
}

// Deterministic split of one plain-text file: the val part starts at the first blank line after 95% of it.
fn split_held_out(text: &str) -> (&str, &str) {
    let mut cut = ((text.len() as f64) * (1.0 - VAL_FRACTION)) as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let blank = ["\r\n\r\n", "\n\n"].iter().filter_map(|b| text[cut..].find(b).map(|i| cut + i)).min();
    let cut = blank.unwrap_or(cut);
    (&text[..cut], &text[cut..])
}

// Tokenizes every document on all cores, EOT before each one, keeping document order.
fn tokenize(docs: &[&str]) -> Vec<u16> {
    let bpe = tokenizer();
    let parts: Vec<Vec<u16>> = docs
        .par_iter()
        .map(|d| {
            let mut t = vec![EOT];
            t.extend(bpe.encode_ordinary(d).into_iter().map(|x| {
                assert!(x < 65536, "GPT-2 ids fit in u16");
                x as u16
            }));
            t
        })
        .collect();
    parts.concat()
}

fn write_shard(path: &Path, tokens: &[u16]) -> Res<()> {
    assert!(tokens.len() <= SHARD_MAX_TOKENS);
    let mut header = [0i32; HEADER_INTS];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = tokens.len() as i32;
    let mut bytes = Vec::with_capacity(HEADER_INTS * 4 + tokens.len() * 2);
    header.iter().for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
    tokens.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    write_atomic(path, &bytes, Existing::Refuse).map(|_| ())
}

// An I/O failure on `path` as one line, with advice that fits its cause.
fn io_error(path: &Path, doing: &str, e: &std::io::Error) -> String {
    let fix = match (e.kind(), e.raw_os_error()) {
        (_, Some(libc::ENOSPC | libc::EDQUOT)) => "free some space or write elsewhere",
        (std::io::ErrorKind::PermissionDenied, _) => "check its permissions",
        (std::io::ErrorKind::NotFound, _) => "check that its folder exists",
        (std::io::ErrorKind::AlreadyExists, _) => "another process wrote it meanwhile; pass another path",
        _ => "check the path",
    };
    format!("{}: cannot {doing} ({e}); {fix}", path.display())
}

// A temporary beside `path` that no other process names (pid and a random part): two runs never share one.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map_or("out".into(), |n| n.to_string_lossy().to_string());
    let id = uuid::Uuid::new_v4().simple().to_string();
    path.with_file_name(format!("{name}.{}-{}.partial", std::process::id(), &id[..8]))
}

// Moves a finished temporary onto `path`: over a file there when `replace`, else only while the name is free
// (renameat2 RENAME_NOREPLACE: no window in which another run's file could be replaced).
fn publish(tmp: &Path, path: &Path, replace: bool) -> std::io::Result<()> {
    if replace {
        return fs::rename(tmp, path);
    }
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(tmp)?, c(path)?);
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// What write_atomic does where a file already holds the name.
#[derive(Clone, Copy)]
enum Existing<'a> {
    Replace,
    Refuse,
    Beside(&'a Path), // this name instead (a checkpoint whose name another run took meanwhile)
}

// Every output file is written here, whole or not at all: into a temporary of its own, synced, then published (see
// `publish`). A crash, a full disk or a second run never leaves a half-written or mixed file at `path`, and a failure
// leaves nothing. Returns where the bytes went.
fn write_atomic(path: &Path, bytes: &[u8], existing: Existing) -> Res<PathBuf> {
    let tmp = temp_beside(path);
    let res = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| match (publish(&tmp, path, matches!(existing, Existing::Replace)), existing) {
            (Err(e), Existing::Beside(other)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                publish(&tmp, other, false).map(|_| other.to_path_buf())
            }
            (r, _) => r.map(|_| path.to_path_buf()),
        });
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error(path, "write", &e)
    })
}

// Where a folder of outputs may go: a new name or an empty folder (a rename replaces an empty folder).
fn new_or_empty(dir: &Path) -> bool {
    !dir.exists() || fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

// A folder written whole or not at all: filled under a temporary name beside `out` (see temp_beside), then renamed
// onto it, so that a failure or a second process never leaves a part of it at `out`. `out` is new or empty; `flag`
// names the option that gave it, in the errors of the folder itself.
// The folder's entries and, after the rename, its name are synced: a power cut leaves the old state or the new.
fn write_dir_atomic<T>(out: &Path, flag: &str, fill: impl FnOnce(&Path) -> Res<T>) -> Res<T> {
    let tmp = temp_beside(out);
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let sync_dir = |d: &Path| fs::File::open(d).and_then(|f| f.sync_all());
    let res = fs::create_dir(&tmp)
        .map_err(|e| format!("{flag} {}", io_error(&tmp, "make this folder", &e)))
        .and_then(|_| fill(&tmp))
        .and_then(|v| {
            sync_dir(&tmp)
                .and_then(|_| fs::rename(&tmp, out))
                .and_then(|_| sync_dir(parent))
                .map(|_| v)
                .map_err(|e| format!("{flag} {}", io_error(out, "move the files in", &e)))
        });
    if res.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    res
}

// An output named on the command line, checked before any work: its folder exists and takes files, it is no folder
// itself, and (unless `replace`) no file holds the name. write_atomic checks again, as another run may act meanwhile.
fn check_output(path: &Path, flag: &str, replace: bool) -> Res<()> {
    let p = path.display();
    if path.is_dir() {
        return Err(format!("{flag} {p}: is a folder; pass a file path"));
    }
    if !replace && path.exists() {
        return Err(format!("{flag} {p}: the file exists; pass --overwrite to replace it, or another path"));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!("{flag} {p}: the folder {} does not exist; create it or pass another path", dir.display()));
    }
    let probe = temp_beside(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("{flag} {}", io_error(dir, "create files in it", &e)))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

// A folder named on the command line for outputs (--profile), made before any work.
fn check_output_dir(dir: &Path, flag: &str) -> Res<()> {
    fs::create_dir_all(dir).map_err(|e| format!("{flag} {}", io_error(dir, "make this folder", &e)))?;
    check_output(&dir.join("probe"), flag, true)
}

fn read_shard(path: &Path) -> Res<Vec<u16>> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{p}: {e}; run `train_gpt prepare` to make the shards"),
        _ => io_error(path, "read this shard", &e),
    })?;
    if bytes.len() < HEADER_INTS * 4 {
        return Err(format!(
            "{p}: {} bytes, shorter than the 1024-byte header; the shard is corrupt, re-run `train_gpt prepare`",
            bytes.len()
        ));
    }
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if int(0) != SHARD_MAGIC {
        return Err(format!(
            "{p}: magic {} is not {SHARD_MAGIC}; not a token shard, re-run `train_gpt prepare`",
            int(0)
        ));
    }
    if int(1) != SHARD_VERSION {
        return Err(format!(
            "{p}: version {} is not {SHARD_VERSION}; re-run `train_gpt prepare` with this harness",
            int(1)
        ));
    }
    let n = int(2);
    let want = HEADER_INTS * 4 + 2 * n.max(0) as usize;
    if n < 0 || bytes.len() != want {
        return Err(format!(
            "{p}: header says {n} tokens ({want} bytes) but the file has {} bytes; the shard is \
            truncated or corrupt, re-run `train_gpt prepare`",
            bytes.len()
        ));
    }
    Ok(bytes[HEADER_INTS * 4..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

fn shard_paths(dir: &Path, split: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{split}_")) && n.ends_with(".bin"))
        })
        .collect();
    v.sort();
    v
}

// One prepare at a time writes an --out: a lock file beside it holds the writer's pid (the lock of a writer that died
// is taken over) and goes when the prepare ends, however it ends.
struct OutLock(PathBuf);

impl OutLock {
    fn take(out: &Path) -> Res<OutLock> {
        let name = out.file_name().map_or("out".into(), |n| n.to_string_lossy().to_string());
        let path = out.with_file_name(format!(".{name}.prepare-lock"));
        for _ in 0..2 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(OutLock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // an empty lock is one being written: its writer is alive
                    let pid = fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
                        return Err(format!(
                            "--out {}: another prepare (pid {pid}) is writing it; wait for it to end (or, if none \
                            runs, remove {})",
                            out.display(),
                            path.display()
                        ));
                    }
                    let _ = fs::remove_file(&path);
                }
                Err(e) => return Err(format!("--out {}", io_error(&path, "create a lock file", &e))),
            }
        }
        Err(format!("--out {}: its lock file {} keeps coming back; remove it", out.display(), path.display()))
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// Shards are written into a folder of their own beside --out, then renamed to it: whole or nothing, also on a full
// disk, and never among other files.
fn cmd_prepare(a: &PrepareArgs) -> Res<()> {
    let (out, o) = (&a.out, a.out.display());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| format!("--out {o}: {}", io_error(parent, "make this folder", &e)))?;
    let _lock = OutLock::take(out)?;
    // checked under the lock: a prepare that ended meanwhile has left its shards
    if !shard_paths(out, "train").is_empty() || !shard_paths(out, "val").is_empty() {
        return Err(format!("{o}: already holds shards; remove them or pass another --out"));
    }
    if fs::canonicalize(out).is_ok_and(|c| fs::canonicalize(&a.input).is_ok_and(|i| i == c)) {
        return Err(format!("--out {o}: is the input; pass another folder for the shards"));
    }
    if !new_or_empty(out) {
        return Err(format!("--out {o}: not an empty folder; pass a new or empty folder for the shards"));
    }
    let t0 = Instant::now();
    let docs = read_documents(&a.input)?;
    let has = |split: &str| docs.iter().any(|(s, t)| s == split && !t.trim().is_empty());
    let i = a.input.display();
    if !has("train") && !has("val") {
        return Err(format!("{i}: no documents with text; pass a corpus"));
    }
    for split in ["train", "val"] {
        if !has(split) {
            return Err(format!(
                "{i}: no {split} documents with text; JSON Lines need some with \"split\": \"{split}\" (plain text \
                is split by itself)"
            ));
        }
    }
    let written = write_dir_atomic(out, "--out", |tmp| {
        let mut report = vec![];
        for split in ["train", "val"] {
            let texts: Vec<&str> = docs.iter().filter(|(s, _)| s == split).map(|(_, t)| t.as_str()).collect();
            let tokens = tokenize(&texts);
            for (i, chunk) in tokens.chunks(SHARD_MAX_TOKENS).enumerate() {
                write_shard(&tmp.join(format!("{split}_{i:06}.bin")), chunk)?;
            }
            report.push(format!("{split}: {} documents, {} tokens", texts.len(), tokens.len()));
        }
        Ok(report)
    });
    written?.iter().for_each(|l| println!("{l}"));
    println!("prepared {o} in {:.1}s with {} threads", t0.elapsed().as_secs_f64(), rayon::current_num_threads());
    Ok(())
}

struct Data {
    train: Vec<u16>,
    val: Vec<u16>,
    info: Value,
}

fn load_data(dir: &Path, vocab: i64) -> Res<Data> {
    if !dir.is_dir() {
        return Err(format!(
            "--data {}: no such folder; pass a folder of shards, made by `train_gpt prepare <corpus> --out DIR`",
            dir.display()
        ));
    }
    let mut hash = Sha256::new();
    let mut shards = vec![];
    let mut load = |split: &str| -> Res<Vec<u16>> {
        let paths = shard_paths(dir, split);
        if paths.is_empty() {
            return Err(format!(
                "{}: no {split}_*.bin shards; run `train_gpt prepare <corpus> --out {}`",
                dir.display(),
                dir.display()
            ));
        }
        let mut all = vec![];
        for p in paths {
            let t = read_shard(&p)?;
            t.iter().for_each(|x| hash.update(x.to_le_bytes()));
            shards.push(json!({"name": p.file_name().unwrap().to_string_lossy(), "tokens": t.len()}));
            all.extend(t);
        }
        if let Some(&m) = all.iter().max() {
            if m as i64 >= vocab {
                return Err(format!("{}: token id {m} ≥ --vocab-size {vocab}; raise --vocab-size", dir.display()));
            }
        }
        Ok(all)
    };
    let train = load("train")?;
    let val = load("val")?;
    let info = json!({"dir": dir.display().to_string(), "train_tokens": train.len(), "val_tokens": val.len(),
                      "shards": shards, "sha256": format!("{:x}", hash.finalize())});
    Ok(Data { train, val, info })
}

// Step i's batch: a contiguous window of b sequences of the train stream (no shuffling: the reference streams it in
// order). A rank reads only its own rows of it, so 1 or N GPUs see the same global batch.
// tokens: the whole train split as int32 on the training device (`device_tokens`), so a step reads its batch there
// and no host copy stands between one step and the next.
fn train_batch(tokens: &Tensor, step: i64, b: i64, t: i64, rank: i64, world: i64) -> (Tensor, Tensor) {
    let (n, len) = (b * t, tokens.size()[0]);
    assert!(len > n + 1, "train split must exceed one batch");
    let start = (step * n) % (len - n - 1);
    let (row0, rows) = rank_rows(b, rank, world);
    inputs_targets(&tokens.narrow(0, start + row0 * t, rows * t + 1).to_kind(Kind::Int64), rows, t)
}

fn device_tokens(tokens: &[u16], dev: Device) -> Tensor {
    Tensor::from_slice(&tokens.iter().map(|&x| x as i32).collect::<Vec<_>>()).to(dev)
}

// The rows [row0, row0 + rows) of n that rank r of `world` owns: equal contiguous blocks, the last one taking any rest.
fn rank_rows(n: i64, rank: i64, world: i64) -> (i64, i64) {
    assert!((0..world).contains(&rank));
    let per = n / world;
    (rank * per, if rank == world - 1 { n - rank * per } else { per })
}

fn window(tokens: &[u16], b: i64, t: i64, dev: Device) -> (Tensor, Tensor) {
    inputs_targets(&Tensor::from_slice(&tokens.iter().map(|&x| x as i64).collect::<Vec<_>>()).to(dev), b, t)
}

// b·t + 1 consecutive tokens → inputs [b, t] and the targets one token on.
fn inputs_targets(w: &Tensor, b: i64, t: i64) -> (Tensor, Tensor) {
    (w.narrow(0, 0, b * t).view([b, t]), w.narrow(0, 1, b * t).view([b, t]))
}

// --------------------------------------------------------------------------------------------------------------------
// Laplacian precompute (tau only): L is F×F with F = head dim; λ(x) = E/(E+τ), E = xᵀLx/(xᵀx+ε)
//
// L is built the way arrowspace builds its manifold, from a domain embedding of the training corpus itself:
//   token co-occurrence (±w) over the K most frequent ids → PPMI → randomised SVD to F dims
//   → k-means (≈√K centroids) → transpose (nodes = the F features) → cosine kNN graph → L = D − W.

const LAP_VOCAB_U16: i64 = 1 << 16; // token ids are u16, so one bincount over 65536 bins covers any corpus

const LAP_MAX_K: usize = 16_384; // K² int64 co-occurrence bins = 2 GiB at the cap

const LAP_RSVD_OVERSAMPLE: i64 = 10; // Halko et al. §4: p ≈ 10 extra columns

const LAP_RSVD_POWER_ITERS: usize = 2; // power iterations sharpen the slowly decaying PPMI spectrum

const LAP_KMEANS_ITERS: usize = 25; // cap on Lloyd iterations (it usually converges earlier)

const LAP_NORM_FLOOR: f64 = 1e-12; // a zero feature profile gets cos = 0 with everything, not NaN

const LAP_SYM_TOL: f64 = 1e-4; // relative to max(1, max|L|)

const LAP_CONNECTED_TOL: f64 = 1e-6; // λ2 above this ⇔ one component, for edge weights of order 0.1–1 as built here

#[derive(Debug, Clone)]
struct LapConfig {
    window: usize,
    n_tokens: usize,
    k_items: usize,
    dim: usize,
    eps: f64,
    topk: usize,
    p: f64,
    sigma: f64,
    seed: u64,
}

impl Default for LapConfig {
    // eps/topk/p/σ are the shipped Tauformer manifold's graph parameters (manifold.json).
    fn default() -> Self {
        LapConfig {
            window: 4,
            n_tokens: 10_000_000,
            k_items: 4096,
            dim: 64,
            eps: 1.31,
            topk: 15,
            p: 1.8,
            sigma: 0.535,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct LapStats {
    build_ms: f64,
    nnz: i64, /* nonzeros of L incl. diagonal */
    deg_min: i64,
    deg_max: i64, /* edges per node */
    lambda2: f64,
    lambda_max: f64,
    connected: bool,
    n_components: i64,
    warning: Option<String>, // the graph and the spectrum disagree: probably no graph Laplacian (logged, not stderr)
}

impl LapStats {
    fn to_json(&self) -> serde_json::Value {
        let mut j = serde_json::json!({ "build_ms": self.build_ms, "nnz": self.nnz, "deg_min": self.deg_min,
            "deg_max": self.deg_max,
            "lambda2": self.lambda2, "lambda_max": self.lambda_max, "connected": self.connected,
            "n_components": self.n_components });
        if let Some(w) = &self.warning {
            j["warning"] = json!(w);
        }
        j
    }
}

/// 1-D path graph: the dense fallback of [TF]; λ2 = 2 − 2cos(π/F).
fn chain_laplacian(f: i64) -> Tensor {
    let off = Tensor::ones([f - 1], (Kind::Float, Device::Cpu));
    let w = off.diag_embed(1, 0, 1) + off.diag_embed(-1, 0, 1);
    w.sum_dim_intlist(1, false, Kind::Float).diag_embed(0, 0, 1) - w
}

fn corpus_laplacian(tokens: &[u16], cfg: &LapConfig, device: Device) -> Result<Tensor, String> {
    let n = cfg.n_tokens.min(tokens.len());
    let (k, f) = (cfg.k_items as i64, cfg.dim as i64);
    let n_centroids = (cfg.k_items as f64).sqrt().round() as i64;
    let bad = |what: String| Err(format!("corpus Laplacian: {what}"));
    if cfg.dim < 2 {
        return bad(format!("dim={} is too small, need ≥ 2; set dim to the head dim", cfg.dim));
    }
    if cfg.k_items < cfg.dim || cfg.k_items > LAP_MAX_K {
        return bad(format!(
            "K={} out of range, need {} ≤ K ≤ {LAP_MAX_K}; set --lap-k in that range",
            cfg.k_items, cfg.dim
        ));
    }
    if cfg.window == 0 || n <= cfg.window {
        return bad(format!(
            "window={} with {n} tokens, need window ≥ 1 and more tokens than the window; raise \
            --lap-tokens or feed more data",
            cfg.window
        ));
    }
    if cfg.topk == 0 || !(cfg.eps > 0.0 && cfg.sigma > 0.0 && cfg.p > 0.0) || !(cfg.eps + cfg.sigma + cfg.p).is_finite()
    {
        return bad(format!(
            "graph params topk={} eps={} σ={} p={} must all be positive and finite; fix the --lap-* flags",
            cfg.topk, cfg.eps, cfg.sigma, cfg.p
        ));
    }
    // libtorch reports bad shapes/OOM by panicking; turn that into the one-line error the caller logs.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = tch::no_grad_guard();
        let toks = Tensor::from_slice(&tokens[..n].iter().map(|&t| t as i32).collect::<Vec<_>>())
            .to_device(device)
            .to_kind(Kind::Int64);
        let cooc =
            lap_cooc(&toks, k, cfg.window as i64).map_err(|e| format!("corpus Laplacian: {e}"))?.to_kind(Kind::Float);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let items = lap_rsvd(&lap_ppmi(&cooc), f, &mut rng); // K×F, f64
        let centroids = lap_kmeans(&items, n_centroids, &mut rng); // X×F
        Ok(lap_feature_laplacian(&centroids, cfg))
    }))
    .unwrap_or_else(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        bad(format!(
            "libtorch failed on {device:?} ({}); retry on CPU or lower --lap-k/--lap-tokens",
            msg.lines().next().unwrap_or("?")
        ))
    })
}

/// Symmetric ±window co-occurrence counts (K×K int64) among the K most frequent ids; rows ordered by frequency.
fn lap_cooc(toks: &Tensor, k: i64, window: i64) -> Result<Tensor, String> {
    let (n, dev) = (toks.size()[0], toks.device());
    let freq = toks.bincount(None::<Tensor>, LAP_VOCAB_U16);
    let distinct = i64::try_from(freq.gt(0).sum(Kind::Int64)).unwrap();
    if distinct < k {
        return Err(format!("only {distinct} distinct tokens in {n}, need K={k}; lower --lap-k"));
    }
    // Ties go to the lower id, so the item set never depends on the device's topk.
    let key = &freq * LAP_VOCAB_U16 + (LAP_VOCAB_U16 - 1) - Tensor::arange(LAP_VOCAB_U16, (Kind::Int64, dev));
    let ids = key.topk(k, 0, true, true).1;
    let remap =
        Tensor::full([LAP_VOCAB_U16], -1, (Kind::Int64, dev)).scatter(0, &ids, &Tensor::arange(k, (Kind::Int64, dev)));
    let item = remap.index_select(0, toks); // item index per token, −1 outside the top K
                                            // Per offset: pair index a·K+b counted by an integer bincount (exact, and
                                            // deterministic on GPU unlike float index_add).
    let mut cooc = Tensor::zeros([k * k], (Kind::Int64, dev));
    for off in 1..=window.min(n - 1) {
        let (a, b) = (item.narrow(0, 0, n - off), item.narrow(0, off, n - off));
        cooc += (&a * k + &b).masked_select(&a.ge(0).logical_and(&b.ge(0))).bincount(None::<Tensor>, k * k);
    }
    let cooc = cooc.view([k, k]);
    Ok(&cooc + cooc.transpose(0, 1)) // symmetric: each pair is seen from both ends
}

/// PPMI = max(0, log(c_ij·total / (r_i·r_j))); zero counts stay 0 (clamps keep log finite, the mask zeroes them).
fn lap_ppmi(c: &Tensor) -> Tensor {
    let row = c.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0).log();
    let pmi = c.clamp_min(1.0).log() + c.sum(Kind::Float).clamp_min(1.0).log() - &row - row.transpose(0, 1);
    pmi.clamp_min(0.0) * c.gt(0.0)
}

fn lap_gaussian(rows: i64, cols: i64, rng: &mut StdRng) -> Tensor {
    // Box–Muller from the seeded RNG: same test matrix on every device (tch's randn has a global, device-specific
    // generator).
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            ((-2.0 * (1.0 - rng.gen::<f64>()).ln()).sqrt() * (std::f64::consts::TAU * rng.gen::<f64>()).cos()) as f32
        })
        .collect();
    Tensor::from_slice(&v).view([rows, cols])
}

/// Randomised truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): returns U_r·diag(S_r), f64, on a's
/// device.
fn lap_rsvd(a: &Tensor, rank: i64, rng: &mut StdRng) -> Tensor {
    let (m, n, dev) = (a.size()[0], a.size()[1], a.device());
    let l = (rank + LAP_RSVD_OVERSAMPLE).min(m).min(n);
    let orth = |y: Tensor| Tensor::linalg_qr(&y, "reduced").0;
    let mut q = orth(a.matmul(&lap_gaussian(n, l, rng).to_device(dev)));
    for _ in 0..LAP_RSVD_POWER_ITERS {
        q = orth(a.transpose(0, 1).matmul(&q));
        q = orth(a.matmul(&q));
    }
    // B = QᵀA is only l×n: its SVD runs in f64 on CPU (deterministic, and tch's linalg_svd driver arg is CUDA-only).
    let b = q.transpose(0, 1).matmul(a).to_device(Device::Cpu).to_kind(Kind::Double);
    let (ub, s, _) = b.svd(true, true);
    let u = q.to_kind(Kind::Double).matmul(&ub.narrow(1, 0, rank).to_device(dev));
    // svd_flip: each column's largest-|·| entry positive, so singular-vector signs (which move cosines) are canonical.
    let sign = u.gather(0, &u.abs().argmax(0, true), false).ge(0.0).to_kind(Kind::Double) * 2.0 - 1.0;
    u * sign * s.narrow(0, 0, rank).to_device(dev)
}

fn lap_sqdist(x: &Tensor, c: &Tensor) -> Tensor {
    (x.square().sum_dim_intlist(1, true, Kind::Double) - x.matmul(&c.transpose(0, 1)) * 2.0
        + c.square().sum_dim_intlist(1, false, Kind::Double))
    .clamp_min(0.0)
}

/// k-means++ seeding (seeded RNG, sampling on CPU) then Lloyd to convergence or LAP_KMEANS_ITERS. x: K×F f64.
fn lap_kmeans(x: &Tensor, n_c: i64, rng: &mut StdRng) -> Tensor {
    let k = x.size()[0];
    let mut picked = vec![rng.gen_range(0..k)];
    let mut d2 = lap_sqdist(x, &x.narrow(0, picked[0], 1)).squeeze_dim(1);
    while (picked.len() as i64) < n_c {
        let w = Vec::<f64>::try_from(&d2.to_device(Device::Cpu)).unwrap();
        let total: f64 = w.iter().sum();
        let next = if total > 0.0 {
            let r = rng.gen::<f64>() * total;
            let mut acc = 0.0;
            w.iter()
                .position(|&v| {
                    acc += v;
                    acc > r
                })
                .unwrap_or_else(|| w.iter().rposition(|&v| v > 0.0).unwrap()) as i64
        } else {
            rng.gen_range(0..k) // all points coincide with the picked ones: any choice is as good
        };
        picked.push(next);
        d2 = d2.minimum(&lap_sqdist(x, &x.narrow(0, next, 1)).squeeze_dim(1));
    }
    let mut c = x.index_select(0, &Tensor::from_slice(&picked).to_device(x.device()));
    let mut prev: Option<Tensor> = None;
    for _ in 0..LAP_KMEANS_ITERS {
        let assign = lap_sqdist(x, &c).argmin(1, false);
        if prev.as_ref().is_some_and(|p| p.equal(&assign)) {
            break;
        }
        // one-hot matmul rather than index_add: float atomics would make GPU runs nondeterministic
        let m = assign.one_hot(n_c).to_kind(Kind::Double);
        let cnt = m.sum_dim_intlist(0, false, Kind::Double).unsqueeze(1);
        // an empty cluster keeps its centroid
        c = (m.transpose(0, 1).matmul(x) / cnt.clamp_min(1.0)).where_self(&cnt.gt(0.0), &c);
        prev = Some(assign);
    }
    c
}

/// Nodes = the F features, each described by its profile over the X centroids; cosine kNN graph; L = D − W (f32, CPU).
fn lap_feature_laplacian(centroids: &Tensor, cfg: &LapConfig) -> Tensor {
    let feats = centroids.transpose(0, 1).to_device(Device::Cpu).to_kind(Kind::Double); // F×X
    let f = feats.size()[0];
    let unit = &feats / feats.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(LAP_NORM_FLOOR);
    let d = (unit.matmul(&unit.transpose(0, 1)).neg() + 1.0).clamp(0.0, 2.0); // unrectified 1 − cos, as arrowspace
    let d = d.masked_fill(&Tensor::eye(f, (Kind::Bool, Device::Cpu)), f64::INFINITY); // no self-loops
    let (dk, jk) = d.topk((cfg.topk as i64).min(f - 1), 1, false, true);
    let wk = ((&dk / cfg.sigma).pow_tensor_scalar(cfg.p) + 1.0).reciprocal() * dk.le(cfg.eps);
    let w = Tensor::zeros([f, f], (Kind::Double, Device::Cpu)).scatter(1, &jk, &wk);
    let w = w.maximum(&w.transpose(0, 1));
    let l = w.sum_dim_intlist(1, false, Kind::Double).diag_embed(0, 0, 1) - w;
    l.to_kind(Kind::Float).contiguous()
}

fn laplacian_stats(l: &Tensor, build_ms: f64) -> LapStats {
    let l = l.to_device(Device::Cpu).to_kind(Kind::Double).contiguous();
    let f = l.size()[0] as usize;
    let eig = Vec::<f64>::try_from(&l.linalg_eigvalsh("L")).unwrap(); // ascending
    let v = Vec::<f64>::try_from(&l.flatten(0, -1)).unwrap();
    let adj = |i: usize, j: usize| i != j && v[i * f + j] != 0.0;
    let deg: Vec<i64> = (0..f).map(|i| (0..f).filter(|&j| adj(i, j)).count() as i64).collect();
    let (mut comp, mut n_components) = (vec![false; f], 0);
    for s in 0..f {
        if comp[s] {
            continue;
        }
        n_components += 1;
        let mut stack = vec![s];
        comp[s] = true;
        while let Some(i) = stack.pop() {
            for j in (0..f).filter(|&j| adj(i, j) && !comp[j]).collect::<Vec<_>>() {
                comp[j] = true;
                stack.push(j);
            }
        }
    }
    let lambda2 = eig.get(1).copied().unwrap_or(0.0);
    let connected = n_components == 1;
    // on stderr this would be a second line before a run's one-line error; the log's laplacian: line carries it
    let warning = (connected != (lambda2 > LAP_CONNECTED_TOL)).then(|| {
        format!(
            "BFS says {n_components} component(s) but λ2={lambda2:.3e}; L is probably not a graph Laplacian (rows \
            should sum to 0, off-diagonals ≤ 0)"
        )
    });
    LapStats {
        build_ms,
        nnz: v.iter().filter(|&&x| x != 0.0).count() as i64,
        deg_min: deg.iter().copied().min().unwrap_or(0),
        deg_max: deg.iter().copied().max().unwrap_or(0),
        lambda2,
        lambda_max: eig.last().copied().unwrap_or(0.0),
        connected,
        n_components,
        warning,
    }
}

/// Minimal .npy reader (v1–v3 header, little-endian f4/f8, C order). tch's read_npy trusts the payload length, so check
/// it here.
fn lap_read_npy(bytes: &[u8]) -> Result<Tensor, String> {
    let bad = |what: &str| Err(format!("{what}; write it with numpy.save(path, L.astype(np.float32))"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return bad("not a .npy file (bad magic bytes)");
    }
    let (start, hlen) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 if bytes.len() >= 12 => (12, u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize),
        v => return bad(&format!("unsupported .npy version {v}")),
    };
    let Some(header) = bytes.get(start..start + hlen).and_then(|h| std::str::from_utf8(h).ok()) else {
        return bad("truncated .npy header");
    };
    let field = |key: &str| header.split(&format!("'{key}':")).nth(1).map(str::trim_start).unwrap_or("");
    let kind = match field("descr").split('\'').nth(1) {
        Some("<f4") => Kind::Float,
        Some("<f8") => Kind::Double,
        d => return bad(&format!("dtype {} unsupported, need little-endian float32/float64", d.unwrap_or("?"))),
    };
    if !field("fortran_order").starts_with("False") {
        return bad("Fortran-ordered array, need C order (np.ascontiguousarray)");
    }
    let shape = field("shape")
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>();
    let Ok(shape) = shape else { return bad("the shape in the .npy header is not a list of sizes ≥ 0") };
    // the bytes the shape needs, where it fits an i64 (the header is data: a dim may be anything)
    let want = shape
        .iter()
        .try_fold(kind.elt_size_in_bytes() as u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64 && shape.iter().all(|&d| d <= i64::MAX as u64));
    let Some(want) = want else { return bad(&format!("the shape {shape:?} in the .npy header is too large")) };
    let data = &bytes[start + hlen..];
    if data.len() as u64 != want {
        return bad(&format!(
            "payload is {} bytes but shape {shape:?} needs {want} (truncated or corrupt)",
            data.len()
        ));
    }
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(data, &shape, kind).map_err(|e| one_line(&e))
}

// A libtorch error (a message and a C++ backtrace) as its first line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("error").to_string()
}

fn load_laplacian_file(path: &Path, dim: i64) -> Result<Tensor, String> {
    let p = path.display();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !path.is_file() {
        return Err(format!("Laplacian file {p}: not found; pass an existing .npy or .safetensors file"));
    }
    let t = match ext {
        "npy" => lap_read_npy(&std::fs::read(path).map_err(|e| format!("Laplacian file {p}: {e}; check permissions"))?)
            .map_err(|e| format!("Laplacian file {p}: {e}"))?,
        "safetensors" => {
            let ts = Tensor::read_safetensors(path).map_err(|e| {
                format!(
                    "Laplacian file {p}: not a valid safetensors file ({}); re-export it with \
                    safetensors.torch.save_file",
                    one_line(&e)
                )
            })?;
            match ts.as_slice() {
                [(_, t)] => t.shallow_clone(),
                _ => {
                    return Err(format!(
                        "Laplacian file {p}: holds {} tensors, need exactly one; save only L",
                        ts.len()
                    ))
                }
            }
        }
        _ => return Err(format!("Laplacian file {p}: unknown extension '.{ext}'; use .npy or .safetensors")),
    };
    if t.size() != [dim, dim] {
        return Err(format!(
            "Laplacian file {p}: shape {:?}, need [{dim}, {dim}] (head dim); rebuild L for this head dim",
            t.size()
        ));
    }
    let t = t.to_kind(Kind::Float).contiguous();
    if !bool::try_from(t.isfinite().all()).unwrap() {
        return Err(format!("Laplacian file {p}: contains NaN/Inf; rebuild it"));
    }
    let scale = f64::try_from(t.abs().max()).unwrap().max(1.0);
    let asym = f64::try_from((&t - t.transpose(0, 1)).abs().max()).unwrap();
    if asym > LAP_SYM_TOL * scale {
        return Err(format!(
            "Laplacian file {p}: not symmetric (max |L−Lᵀ| = {asym:.3e}); symmetrise it, e.g. (L+L.T)/2"
        ));
    }
    Ok(t)
}

// L as a .npy (v1, little-endian f32, C order), written whole (write_atomic) and never over a file.
fn save_laplacian(path: &Path, l: &Tensor) -> Result<(), String> {
    let sz = l.size();
    if sz.len() != 2 || sz[0] != sz[1] {
        return Err(format!("save_laplacian {}: shape {sz:?} is not square; pass the F×F Laplacian", path.display()));
    }
    let v = Vec::<f32>::try_from(l.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1)).unwrap();
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", sz[0], sz[1]);
    let pad = 63 - (10 + dict.len()) % 64; // numpy aligns the data to 64 bytes; the header ends in a newline
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend(header.bytes().chain(v.iter().flat_map(|x| x.to_le_bytes())));
    write_atomic(path, &bytes, Existing::Refuse).map(|_| ())
}

// --laplacian chain|corpus|file:PATH → (L, stats json). The corpus build reads the head of the train split.
fn build_laplacian(a: &TrainArgs, f: i64, data: &Data, dev: Device) -> Res<(Tensor, Value)> {
    let t0 = Instant::now();
    let l = match a.laplacian.as_str() {
        "chain" => chain_laplacian(f),
        "corpus" => {
            let cfg = LapConfig {
                window: a.lap_window,
                n_tokens: a.lap_tokens,
                k_items: a.lap_k,
                dim: f as usize,
                eps: a.lap_eps,
                topk: a.lap_topk,
                p: a.lap_p,
                sigma: a.lap_sigma,
                seed: a.seed as u64,
            };
            corpus_laplacian(&data.train, &cfg, dev)?
        }
        s => match s.strip_prefix("file:") {
            Some(path) => load_laplacian_file(Path::new(path), f)?,
            None => return Err(format!("--laplacian {s}: unknown source; use corpus, chain or file:PATH")),
        },
    };
    sync(dev);
    let mut stats = laplacian_stats(&l, t0.elapsed().as_secs_f64() * 1e3).to_json();
    stats["source"] = json!(a.laplacian);
    Ok((l, stats))
}

// --------------------------------------------------------------------------------------------------------------------
// Kernels bridge: kernels/ext.cpp and kernels/*.cu through C entry points (tch handles are at::Tensor*)

mod ext {
    use std::os::raw::{c_char, c_void};
    extern "C" {
        pub fn tg_memory_peaks(device: i32, peak_allocated: *mut i64, peak_reserved: *mut i64);
        pub fn tg_reset_memory_peaks(device: i32);
        pub fn tg_set_device(device: i32);
        pub fn tg_memory_allocated(device: i32) -> i64;
        // at::Tensor* in and out: tch's handles
        pub fn tg_tau_attention(
            lq: *mut c_void,
            lk: *mut c_void,
            v: *mut c_void,
            it: *mut c_void,
            chunk: i64,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn tg_tau_flash(
            lq: *mut c_void,
            lk: *mut c_void,
            v: *mut c_void,
            it: *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn tg_tau_bias(
            lq: *mut c_void,
            lk: *mut c_void,
            alpha: *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn tg_softcap_ce(
            z: *mut c_void,
            y: *mut c_void,
            softcap: f64,
            scale: f64,
            grad: i32,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn tg_rmsnorm(x: *mut c_void, out_dtype: i32, eps: f64, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_add_rmsnorm(
            x: *mut c_void,
            y: *mut c_void,
            out_dtype: i32,
            eps: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        pub fn tg_rope_norm(
            qkv: *mut c_void,
            cos: *mut c_void,
            sin: *mut c_void,
            h: i64,
            g: i64,
            pos: i64,
            eps: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        pub fn tg_relu2(u: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_taumode(
            x: *mut c_void,
            lap: *mut c_void,
            tau: f64,
            eps: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        pub fn tg_readback_start(t: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_readback_wait(h: *mut c_void) -> f64;
        pub fn tg_foreach_lerp(
            a: *const *mut c_void,
            b: *const *mut c_void,
            n: i32,
            w: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        pub fn tg_foreach_add_(
            a: *const *mut c_void,
            b: *const *mut c_void,
            n: i32,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
        pub fn tg_foreach_zero_(a: *const *mut c_void, n: i32, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_profile_start(cuda: i32, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_profile_stop(path: *const c_char, err: *mut c_char, errlen: usize) -> i32;
    }
}

// Calls into kernels/ext.cpp with an error buffer: (the result, the error message it wrote, "" if none).
fn ffi<T>(call: impl FnOnce(*mut std::os::raw::c_char, usize) -> T) -> (T, String) {
    let mut buf = vec![0u8; 512];
    let r = call(buf.as_mut_ptr() as *mut _, buf.len());
    (r, String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]).to_string())
}

// tch's handle of a tensor is the at::Tensor* that kernels/ext.cpp takes.
fn handle(t: &Tensor) -> *mut std::os::raw::c_void {
    t.as_ptr() as *mut _
}

// Multi-tensor updates (ATen's _foreach ops, which tch lacks): one launch for a list where a loop makes one a tensor.
fn handles(ts: &[&Tensor]) -> Vec<*mut std::os::raw::c_void> {
    ts.iter().map(|t| handle(t)).collect()
}

// A kernels/ext.cpp call's (return code, error): 0 or the error.
fn ext_ok(what: &str, (rc, err): (i32, String)) {
    assert!(rc == 0, "{what}: {err}");
}

// A tensor returned by kernels/ext.cpp: an at::Tensor* we now own, or null and the error it wrote.
fn ext_tensor(what: &str, (out, err): (*mut std::os::raw::c_void, String)) -> Tensor {
    assert!(!out.is_null(), "{what}: {err}");
    unsafe { Tensor::from_ptr(out as *mut _) }
}

// a[i] ← lerp(a[i], b[i], w)
fn foreach_lerp_(a: &[&Tensor], b: &[&Tensor], w: f64) {
    let (ha, hb) = (handles(a), handles(b));
    ext_ok(
        "foreach lerp_",
        ffi(|e, n| unsafe {
            ext::tg_foreach_lerp(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, w, std::ptr::null_mut(), e, n)
        }),
    );
}

// lerp(a[i], b[i], w), new tensors
fn foreach_lerp(a: &[&Tensor], b: &[&Tensor], w: f64) -> Vec<Tensor> {
    let (ha, hb) = (handles(a), handles(b));
    let mut out = vec![std::ptr::null_mut(); ha.len()];
    ext_ok(
        "foreach lerp",
        ffi(|e, n| unsafe {
            ext::tg_foreach_lerp(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, w, out.as_mut_ptr(), e, n)
        }),
    );
    out.into_iter().map(|p| unsafe { Tensor::from_ptr(p as *mut _) }).collect()
}

// a[i] += b[i]
fn foreach_add_(a: &[&Tensor], b: &[&Tensor]) {
    let (ha, hb) = (handles(a), handles(b));
    ext_ok(
        "foreach add_",
        ffi(|e, n| unsafe { ext::tg_foreach_add_(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, e, n) }),
    );
}

fn foreach_zero_(a: &[&Tensor]) {
    let ha = handles(a);
    ext_ok("foreach zero_", ffi(|e, n| unsafe { ext::tg_foreach_zero_(ha.as_ptr(), ha.len() as i32, e, n) }));
}

// taumode through a CUDA kernel each way (kernels/block_ops.cu, on tensor cores): x [B, heads, T, D] bf16 → (E, λ)
// fp32, λ differentiable, E not (it only calibrates τ and feeds the diagnostics).
fn taumode_fused(x: &Tensor, lap: &Tensor, tau: f64) -> (Tensor, Tensor) {
    let mut out = [std::ptr::null_mut(); 2];
    ext_ok(
        "taumode (fused)",
        ffi(|e, n| unsafe { ext::tg_taumode(handle(x), handle(lap), tau, LAMBDA_EPS, out.as_mut_ptr(), e, n) }),
    );
    let [e, lam] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (e, lam)
}

// The same attention, `chunk` query rows at a time with the backward recomputing the scores (kernels/ext.cpp), so
// that at most chunk×T scores exist at once instead of T×T.
fn tau_attention_chunked(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor, chunk: i64) -> Tensor {
    ext_tensor(
        "tau attention (chunked)",
        ffi(|e, n| unsafe { ext::tg_tau_attention(handle(lq), handle(lk), handle(v), handle(inv_temp), chunk, e, n) }),
    )
}

// The same attention through the CUDA kernels of kernels/tau_attn.cu: the scores are made tile by tile in registers,
// fed to tensor cores and never stored; the backward recomputes them from λq, λk and each row's max and softmax norm.
// Memory O(B·H·T) beyond the inputs. λ and inv_temp fp32, head dim in FUSED_HEAD_DIMS. The kernel takes bf16 V (its
// products are bf16 tensor-core ops); fp32 V, which wants fp32 products, goes through the chunked path with
// F32_TAU_CHUNK rows. The output is a [B,H,Tq,D] view of [B,Tq,H,D] memory, as the output projection reads it.
fn tau_attention_fused(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor) -> Tensor {
    if v.kind() != Kind::BFloat16 {
        return tau_attention_chunked(lq, lk, v, inv_temp, F32_TAU_CHUNK);
    }
    ext_tensor(
        "tau attention (fused)",
        ffi(|e, n| unsafe { ext::tg_tau_flash(handle(lq), handle(lk), handle(v), handle(inv_temp), e, n) }),
    )
}

// tau-bias's prior −α_h|λq − λk| as a bf16 attention bias [B,H,Tq,Tk] (−inf after each query's position) through
// kernels/tau_bias.cu: one pass each way where the plain ops take five fp32 T×T passes forward and more backward.
fn tau_bias_fused(lq: &Tensor, lk: &Tensor, alpha: &Tensor) -> Tensor {
    ext_tensor(
        "tau-bias prior (fused)",
        ffi(|e, n| unsafe { ext::tg_tau_bias(handle(lq), handle(lk), handle(alpha), e, n) }),
    )
}

// Per-row losses (fp32 [N]) of the soft-capped logits SOFTCAP·tanh(z/SOFTCAP) against y [N] through the CUDA kernel of
// kernels/softcap_ce.cu; with grad, z [N,V] (bf16 or fp32, no graph) is overwritten with d(scale·Σ loss)/dz. A target
// outside [0, V) gives its row a NaN loss and gradient.
fn softcap_ce_fused(z: &mut Tensor, y: &Tensor, scale: f64, grad: bool) -> Tensor {
    ext_tensor(
        "cross-entropy (fused)",
        ffi(|e, n| unsafe { ext::tg_softcap_ce(handle(z), handle(y), SOFTCAP, scale, grad as i32, e, n) }),
    )
}

// RMSNorm of x (fp32 or bf16) over its last dim, written in `kind` (fp32 or bf16): rms(x).to_kind(kind) in one CUDA
// kernel each way (kernels/block_ops.cu).
fn rmsnorm_fused(x: &Tensor, kind: Kind) -> Tensor {
    let dtype = norm_out_dtype("rmsnorm (fused)", kind);
    ext_tensor("rmsnorm (fused)", ffi(|e, n| unsafe { ext::tg_rmsnorm(handle(x), dtype, RMS_EPS, e, n) }))
}

// The RMSNorm kernels' output dtype as the c10::ScalarType code kernels/ext.cpp takes: fp32 or bf16.
fn norm_out_dtype(what: &str, kind: Kind) -> i32 {
    match kind {
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        k => panic!("{what}: output {k:?}; want fp32 or bf16"),
    }
}

// The residual add and the next RMSNorm: (s = x + y, rms(s).to_kind(kind)) for the fp32 stream x and a branch y (fp32
// or bf16), one CUDA kernel each way (kernels/block_ops.cu).
fn add_rmsnorm_fused(x: &Tensor, y: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let dtype = norm_out_dtype("add+rmsnorm (fused)", kind);
    let mut out = [std::ptr::null_mut(); 2];
    ext_ok(
        "add+rmsnorm (fused)",
        ffi(|e, n| unsafe { ext::tg_add_rmsnorm(handle(x), handle(y), dtype, RMS_EPS, out.as_mut_ptr(), e, n) }),
    );
    let [s, h] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (s, h)
}

// The qkv projection's output y [B,T,(H+2G)·D] → q [B,T,H,D], k and v [B,T,G,D]: q and k rotated (positions pos..)
// then RMS-normed per head, v copied; one CUDA kernel each way (kernels/block_ops.cu).
fn rope_norm_fused(y: &Tensor, cos: &Tensor, sin: &Tensor, h: i64, g: i64, pos: i64) -> (Tensor, Tensor, Tensor) {
    let mut out = [std::ptr::null_mut(); 3];
    ext_ok(
        "rope+qk-norm (fused)",
        ffi(|e, n| unsafe {
            ext::tg_rope_norm(handle(y), handle(cos), handle(sin), h, g, pos, RMS_EPS, out.as_mut_ptr(), e, n)
        }),
    );
    let [q, k, v] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (q, k, v)
}

// max(u, 0)² in one CUDA kernel each way (kernels/block_ops.cu).
fn relu2_fused(u: &Tensor) -> Tensor {
    ext_tensor("relu² (fused)", ffi(|e, n| unsafe { ext::tg_relu2(handle(u), e, n) }))
}

// A scalar tensor's value on its way to the host. On CUDA a non-blocking copy and an event: `wait` blocks until the
// copy is done, not until the work queued after it is, so the host can queue the next step first. On the CPU, the
// value.
struct Readback(Result<f64, *mut std::os::raw::c_void>);

impl Readback {
    fn start(t: &Tensor) -> Readback {
        if !t.device().is_cuda() {
            return Readback(Ok(t.double_value(&[])));
        }
        let (h, err) = ffi(|e, n| unsafe { ext::tg_readback_start(handle(t), e, n) });
        assert!(!h.is_null(), "{err}");
        Readback(Err(h))
    }
    fn wait(mut self) -> f64 {
        match std::mem::replace(&mut self.0, Ok(f64::NAN)) {
            Ok(v) => v,
            Err(h) => unsafe { ext::tg_readback_wait(h) },
        }
    }
}

impl Drop for Readback {
    fn drop(&mut self) {
        if let Err(h) = self.0 {
            unsafe { ext::tg_readback_wait(h) };
        }
    }
}

// Runs f under the Kineto profiler (CPU ops; on CUDA also kernels) and writes its Chrome trace to `path`, whole or not
// at all.
fn profiled<T>(path: &Path, dev: Device, f: impl FnOnce() -> Res<T>) -> Res<T> {
    let fail = |(rc, err): (i32, String)| if rc == 0 { Ok(()) } else { Err(format!("profiler: {err}")) };
    fail(ffi(|e, n| unsafe { ext::tg_profile_start(dev.is_cuda() as i32, e, n) }))?;
    let out = f();
    let tmp = temp_beside(path);
    let c = std::ffi::CString::new(tmp.to_string_lossy().as_bytes()).unwrap();
    fail(ffi(|e, n| unsafe { ext::tg_profile_stop(c.as_ptr(), e, n) }))
        .and_then(|_| publish(&tmp, path, true).map_err(|e| io_error(path, "write", &e)))
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    out
}

// (peak allocated, peak reserved) in MiB on the CUDA device, as torch.cuda.max_memory_allocated/reserved.
fn memory_peaks(dev: Device) -> Option<(f64, f64)> {
    let Device::Cuda(i) = dev else { return None };
    let (mut a, mut r) = (0i64, 0i64);
    unsafe { ext::tg_memory_peaks(i as i32, &mut a, &mut r) };
    Some((a as f64 / 1048576.0, r as f64 / 1048576.0))
}

// Starts the peaks of `memory_peaks` afresh (torch.cuda.reset_peak_memory_stats); nothing to do on the CPU.
fn reset_memory_peaks(dev: Device) {
    if let Device::Cuda(i) = dev {
        unsafe { ext::tg_reset_memory_peaks(i as i32) };
    }
}

// Bytes allocated on a CUDA device now (None on the CPU: no allocator statistics there).
fn memory_allocated(dev: Device) -> Option<i64> {
    let Device::Cuda(i) = dev else { return None };
    sync(dev);
    Some(unsafe { ext::tg_memory_allocated(i as i32) })
}

// --------------------------------------------------------------------------------------------------------------------
// Model: GPT with weightless RMSNorm, RoPE + QK-norm, ReLU² MLP, tied embeddings, soft-capped logits

#[derive(Clone, Serialize, serde::Deserialize, Debug, PartialEq)]
struct ModelCfg {
    n_layer: i64,
    n_head: i64,
    #[serde(default)] // checkpoints from before grouped heads: 0, as many key/value heads as query heads
    n_kv_head: i64,
    n_embd: i64,
    seq_len: i64,
    vocab_size: i64,
    attn: String, // a name in ATTENTIONS
    #[serde(default)]
    window: i64, // sliding: keys a query sees
    #[serde(default = "one")]
    bands: i64, // tau-multi: bands of L
    #[serde(default = "one_f")]
    tau_temp: f64, // tau: fixed temperature (at init; a checkpoint's buffers hold it)
    #[serde(default = "one_f")]
    inv_temp_init: f64, // learned inverse temperatures at init
}

fn one() -> i64 {
    1
}

fn one_f() -> f64 {
    1.0
}

impl ModelCfg {
    fn from_args(a: &TrainArgs, attn: &str) -> ModelCfg {
        ModelCfg {
            n_layer: a.n_layer,
            n_head: a.n_head,
            n_kv_head: a.n_kv_head,
            n_embd: a.n_embd,
            seq_len: a.seq_len,
            vocab_size: a.vocab_size,
            attn: attn.to_string(),
            window: a.window,
            bands: a.bands,
            tau_temp: a.tau_temp,
            inv_temp_init: a.inv_temp_init,
        }
    }
    // Key/value heads (grouped-query attention when fewer than the query heads; each serves n_head / kv_heads of them).
    fn kv_heads(&self) -> i64 {
        if self.n_kv_head > 0 {
            self.n_kv_head
        } else {
            self.n_head
        }
    }
    fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }
    fn attention(&self) -> &'static dyn Attention {
        attention(&self.attn)
            .unwrap_or_else(|| panic!("attn {:?} unchecked: ModelCfg::check names the known ones", self.attn))
    }
    // Whether the variant uses a Laplacian (and so τ, energies, the diagnostics).
    fn is_tau(&self) -> bool {
        self.attention().laplacian_dim(self).is_some()
    }
    // A config read from a file is data: checked, bounds included, before any tensor is made from it.
    fn check(&self) -> Res<()> {
        let (l, h, c, v, t) = (self.n_layer, self.n_head, self.n_embd, self.vocab_size, self.seq_len);
        let within = |x: i64, hi: i64| (1..=hi).contains(&x);
        if !(within(l, 1024) && within(h, 1024) && within(c, 1 << 16) && within(v, 1 << 24)) {
            return Err(format!(
                "config n_layer {l}, n_head {h}, n_embd {c}, vocab_size {v}: expected 1..=1024, 1..=1024, 1..=65536, \
                1..=16777216"
            ));
        }
        if c % h != 0 || (c / h) % 2 != 0 {
            return Err(format!("config n_embd {c}: expected heads of even size (n_head {h})"));
        }
        if self.n_kv_head < 0 || h % self.kv_heads() != 0 {
            return Err(format!("config n_kv_head {}: expected a divisor of n_head {h} (0: n_head)", self.n_kv_head));
        }
        if !(2..=MAX_SEQ_LEN).contains(&t) {
            return Err(format!("config seq_len {t}: expected 2..={MAX_SEQ_LEN}"));
        }
        match attention(&self.attn) {
            Some(a) => a.check(self),
            None => Err(format!("config attn {:?}: expected one of {}", self.attn, attention_names().join(", "))),
        }
    }
    // The trained parameters' names and shapes, in Model::new's order (a unit test holds the two together).
    fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (c, qkv) = (self.n_embd, self.n_embd + 2 * self.kv_heads() * self.head_dim());
        let mut v = vec![("wte".to_string(), vec![self.vocab_size, c])];
        for l in 0..self.n_layer {
            v.push((format!("blocks.{l}.attn.qkv"), vec![qkv, c]));
            v.push((format!("blocks.{l}.attn.o"), vec![c, c]));
            v.push((format!("blocks.{l}.mlp.fc"), vec![4 * c, c]));
            v.push((format!("blocks.{l}.mlp.proj"), vec![c, 4 * c]));
            for t in self.attention().layer_tensors(self).into_iter().filter(|t| t.trained) {
                v.push((format!("blocks.{l}.attn.{}", t.name), t.shape));
            }
        }
        v
    }
    // The fixed tensors a checkpoint also holds, in Model::new's order: the variant's untrained layer tensors, then its
    // Laplacian (F×F, or bands×F×F) and τ a band.
    fn buffer_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let attn = self.attention();
        let mut v = vec![];
        for l in 0..self.n_layer {
            for t in attn.layer_tensors(self).into_iter().filter(|t| !t.trained) {
                v.push((format!("blocks.{l}.attn.{}", t.name), t.shape));
            }
        }
        if let Some(f) = attn.laplacian_dim(self) {
            let r = attn.bands(self);
            v.push(("laplacian".into(), if r == 1 { vec![f, f] } else { vec![r, f, f] }));
            v.push(("tau".into(), vec![r]));
        }
        v
    }
}

struct Model {
    cfg: ModelCfg,
    attn: &'static dyn Attention,
    params: Vec<(String, Tensor)>,  // trained: fp32 master weights, in checkpoint order
    buffers: Vec<(String, Tensor)>, // fixed: the variant's untrained layer tensors, then L and τ, in checkpoint order
    cos: Tensor,
    sin: Tensor,
    lap: Tensor,      // the variant's Laplacian (fp32): F×F, or bands×F×F; empty without one
    tau: Vec<f64>,    // τ a band (1.0 until calibrated); empty without a Laplacian
    cdt: Kind,        // compute dtype (bf16 on CUDA)
    tau_chunk: i64,   // tau: query rows a chunk in `tau_attention_chunked` (0: the plain path)
    kernels: Kernels, // fused: tau runs `tau_attention_fused` (then tau_chunk is 0), the head `softcap_ce_fused`
}

fn rms(x: &Tensor) -> Tensor {
    // eps None: libtorch picks finfo(dtype).eps, as F.rms_norm in the reference
    x.rms_norm([*x.size().last().unwrap()], None::<Tensor>, None)
}

// RoPE's cos and sin for positions 0..n, [n, d/2] (fp32).
fn rope_tables(d: i64, n: i64, dev: Device) -> (Tensor, Tensor) {
    let inv = Tensor::arange_start_step(0, d, 2, (Kind::Float, dev))
        .divide_scalar(d as f64)
        .multiply_scalar(-ROPE_BASE.ln())
        .exp();
    let f = Tensor::arange(n, (Kind::Float, dev)).outer(&inv);
    (f.cos(), f.sin())
}

// Rotates x [B,H,T,D] as positions pos..pos+T (pos > 0 when decoding after a cached prefix).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pos: i64) -> Tensor {
    let (t, d) = (x.size()[2], x.size()[3] / 2);
    let (c, s) = (cos.narrow(0, pos, t).to_kind(x.kind()), sin.narrow(0, pos, t).to_kind(x.kind()));
    let (x1, x2) = (x.narrow(-1, 0, d), x.narrow(-1, d, d));
    Tensor::cat(&[&x1 * &c + &x2 * &s, -&x1 * &s + &x2 * &c], -1)
}

// The qkv projection's output y [B,T,(H+G+G)·D] → q [B,H,T,D], k and v [B,G,T,D] (views): q and k rotated (positions
// pos..) then RMS-normed per head. The plain path of `rope_norm_fused`.
fn rope_norm(y: &Tensor, cos: &Tensor, sin: &Tensor, h: i64, g: i64, pos: i64) -> (Tensor, Tensor, Tensor) {
    let (b, t) = (y.size()[0], y.size()[1]);
    let d = y.size()[2] / (h + 2 * g);
    let heads = |first: i64, n: i64| y.narrow(-1, first * d, n * d).view([b, t, n, d]).transpose(1, 2);
    (rms(&rope(&heads(0, h), cos, sin, pos)), rms(&rope(&heads(h, g), cos, sin, pos)), heads(h + g, g))
}

// taumode: per-vector Laplacian energy E and its bounded form λ = E/(E+τ) ∈ [0,1), in fp32 (f64 stays f64 for tests).
fn taumode(x: &Tensor, lap: &Tensor, tau: f64) -> (Tensor, Tensor) {
    let xf = if x.kind() == Kind::Double { x.shallow_clone() } else { x.to_kind(Kind::Float) };
    let e = energy(&xf.matmul(&lap.to_kind(xf.kind())), &xf);
    let lam = &e / (&e + tau);
    (e, lam)
}

// E = xᵀLx / (xᵀx + ε) over the last dim, from x·L (`xl`) and x (fp32 or f64), x broadcasting against xl (bands).
fn energy(xl: &Tensor, x: &Tensor) -> Tensor {
    (xl * x).sum_dim_intlist(-1, false, x.kind()) / (x.square().sum_dim_intlist(-1, false, x.kind()) + LAMBDA_EPS)
}

// Tau attention over scalars: logits −|λq(i) − λk(j)|·inv_temp, causal, softmax, then the full value vectors.
// It reads only (λk, V) of the keys, which is what a decoding cache would hold. Plain path: T×T scores in memory.
fn tau_attention(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor) -> Tensor {
    distance_attention(&(lq.unsqueeze(-1) - lk.unsqueeze(-2)).abs(), v, inv_temp)
}

// Attention by distance: logits −dist(i, j)·inv_temp [B,H,Tq,Tk], the queries the last Tq positions, causal.
fn distance_attention(dist: &Tensor, v: &Tensor, inv_temp: &Tensor) -> Tensor {
    let att = -dist * inv_temp.view([1, -1, 1, 1]);
    let (tq, tk) = (att.size()[2], att.size()[3]);
    // one decoding query sees every key: no mask to build
    let att = if tq == 1 { att } else { att.masked_fill(&future(tq, tk, att.device()), f64::NEG_INFINITY) };
    att.softmax(-1, att.kind()).to_kind(v.kind()).matmul(v)
}

// [Tq,Tk] true where key j is after query i, the queries the last Tq of Tk positions.
fn future(tq: i64, tk: i64, dev: Device) -> Tensor {
    Tensor::ones([tq, tk], (Kind::Bool, dev)).tril(tk - tq).logical_not()
}

// Decoding cache, per layer: what the variant keeps of each key along time (causal: K [B,Hkv,T,D] and V; tau: λk
// [B,Hkv,T] fp32 and V), allocated once for `cap` tokens.
struct Cache {
    layers: Vec<Vec<Tensor>>,
    len: i64,
    cap: i64,
}

impl Cache {
    fn new(n_layer: i64, cap: i64) -> Cache {
        Cache { layers: (0..n_layer).map(|_| vec![]).collect(), len: 0, cap }
    }
    // Tokens cached so far.
    fn len(&self) -> i64 {
        self.len
    }
    // Writes layer l's new entries (time on dim 2) after the cached ones; returns all of them (views, no copy).
    fn append(&mut self, l: i64, new: Vec<Tensor>) -> Vec<Tensor> {
        let (t, len, cap) = (new[0].size()[2], self.len, self.cap);
        assert!(len + t <= cap, "cache full: {len} + {t} tokens > capacity {cap}");
        let held = &mut self.layers[l as usize];
        if held.is_empty() {
            *held = new
                .iter()
                .map(|x| {
                    let mut sz = x.size();
                    sz[2] = cap;
                    Tensor::zeros(sz.as_slice(), (x.kind(), x.device()))
                })
                .collect();
        }
        held.iter()
            .zip(&new)
            .map(|(c, x)| {
                c.narrow(2, len, t).copy_(x);
                c.narrow(2, 0, len + t)
            })
            .collect()
    }
    // Called once every layer has appended the same t tokens.
    fn advance(&mut self, t: i64) {
        self.len += t;
    }
    // Bytes allocated (the whole capacity).
    fn bytes(&self) -> i64 {
        self.layers.iter().flatten().map(|x| (x.numel() * x.kind().elt_size_in_bytes()) as i64).sum()
    }
}

// The keys and values a layer attends over: with a cache, the cached ones and these (which join it); else these.
fn through_cache(cache: Option<&mut Cache>, l: i64, new: Vec<Tensor>) -> Vec<Tensor> {
    match cache {
        Some(c) => c.append(l, new),
        None => new,
    }
}

// The log's word on the variant: its attention's path and what a token costs its decoding cache.
fn attention_line(cfg: &ModelCfg, kernels: Kernels, cdt: Kind) -> String {
    let attn = cfg.attention();
    let path = match (kernels, attn.fused()) {
        (Kernels::Fused, true) => "fused".to_string(),
        (Kernels::Fused, false) => {
            format!("plain (no fused kernel for {}; the block's other kernels are fused)", cfg.attn)
        }
        _ => "plain".to_string(),
    };
    format!("{} kernels:{path} cache_bytes_per_token:{}", cfg.attn, cache_bytes_formula(cfg, cdt, 1, 1))
}

// What the cache must hold for b sequences of t tokens.
fn cache_bytes_formula(cfg: &ModelCfg, cdt: Kind, b: i64, t: i64) -> i64 {
    cfg.n_layer * b * t * cfg.attention().cache_bytes(cfg, cdt)
}

// ---- Attention variants. A variant is one `impl Attention` and its entry in ATTENTIONS: `--attn NAME` picks it,
// `train_gpt train --help` lists it, checkpoints, the decoding cache, bench and the logs take it from there.

// A per-layer tensor of a variant, blocks.{l}.attn.{name}: a constant at init (no draw from the RNG, so every variant
// of a seed starts from the same weights elsewhere), trained by Adam, or a fixed buffer the checkpoint keeps.
struct LayerTensor {
    name: &'static str,
    shape: Vec<i64>,
    init: f64,
    trained: bool,
}

trait Attention: Sync {
    fn name(&self) -> &'static str;
    // One line for --help.
    fn about(&self) -> &'static str;
    // Config the variant cannot run.
    fn check(&self, _c: &ModelCfg) -> Res<()> {
        Ok(())
    }
    // The size F of the Laplacian its energies use (built by --laplacian as F×F); None: no L, τ or energies.
    fn laplacian_dim(&self, _c: &ModelCfg) -> Option<i64> {
        None
    }
    // Energies a vector: 1 (one F×F L, one τ) or r bands of L (r×F×F, r τ's), made from the built L by `bands_of`.
    fn bands(&self, _c: &ModelCfg) -> i64 {
        1
    }
    fn layer_tensors(&self, _c: &ModelCfg) -> Vec<LayerTensor> {
        vec![]
    }
    // (E, λ) of q or k [B, heads, T, D] against the model's L at τ (a band each); calibration reads E at τ = 1.
    fn energies(&self, m: &Model, x: &Tensor, tau: &[f64]) -> (Tensor, Tensor) {
        m.energies(x, tau[0])
    }
    // y [B,H,T,D] of layer l from q [B,H,T,D] and k, v [B,Hkv,T,D] at the positions after the cache's: the keys join
    // the cache as this variant keeps them; its scalar keys go to `lams` for the diagnostics.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        lams: Option<&mut Vec<Tensor>>,
    ) -> Tensor;
    // Bytes one token adds to one layer's decoding cache.
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64;
    // Whether --kernels fused has a kernel for this attention; without one it runs on libtorch ops (the log says so).
    fn fused(&self) -> bool;
}

static ATTENTIONS: [&dyn Attention; 7] =
    [&Causal, &Sliding, &Tau { learned: false }, &Tau { learned: true }, &TauFull, &TauMulti, &TauBias];

fn attention(name: &str) -> Option<&'static dyn Attention> {
    ATTENTIONS.iter().copied().find(|a| a.name() == name)
}

fn attention_names() -> Vec<&'static str> {
    ATTENTIONS.iter().map(|a| a.name()).collect()
}

// --attn's values, each with its line of help.
fn attention_values() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        ATTENTIONS.iter().map(|a| clap::builder::PossibleValue::new(a.name()).help(a.about())),
    )
}

// x [B, h, T, ...] with h = 1 or a divisor of `heads`, repeated along dim 1 to `heads` (grouped-query attention).
fn to_heads(x: Tensor, heads: i64) -> Tensor {
    let h = x.size()[1];
    match h {
        _ if h == heads => x,
        1 => {
            let mut sz = x.size();
            sz[1] = heads;
            x.expand(sz.as_slice(), false)
        }
        _ => x.repeat_interleave_self_int(heads / h, 1, None),
    }
}

// Dot-product attention of q [B,H,Tq,D] over k, v [B,Hkv,Tk,D], the queries the last Tq positions: causal, or as
// `mask` says ([Tq,Tk] or [B,H,Tq,Tk]: bool, true where a query may look, or an additive float bias).
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<Tensor>) -> Tensor {
    let (t, tk) = (q.size()[2], k.size()[2]);
    let gqa = k.size()[1] < q.size()[1];
    // is_causal aligns the mask top-left; queries after a cached prefix need it bottom-right. One new query sees every
    // key: no mask, so SDPA keeps its fused kernels while decoding.
    let (mask, causal) = match mask {
        Some(m) => (Some(m), false),
        None => ((tk > t && t > 1).then(|| future(t, tk, q.device()).logical_not()), tk == t),
    };
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None, gqa)
}

// The queries' and keys' energies through the variant, the keys' λ through the cache with V, the query heads'
// inverse temperatures; the attention of tau-style variants over (λq, λk, V) then picks the model's path.
fn tau_inputs(
    m: &Model,
    l: i64,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: Option<&mut Cache>,
    lams: Option<&mut Vec<Tensor>>,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let h = m.cfg.n_head;
    let (lq, lk) = lambdas(m, q, k, lams);
    let [lk, v]: [Tensor; 2] = through_cache(cache, l, vec![lk, v.shallow_clone()]).try_into().unwrap();
    (to_heads(lq, h), to_heads(lk, h), to_heads(v, h), m.layer(l, "log_inv_temp").exp())
}

// The variant's λq and λk of this layer's q and k; λk also to `lams` for the diagnostics.
fn lambdas(m: &Model, q: &Tensor, k: &Tensor, lams: Option<&mut Vec<Tensor>>) -> (Tensor, Tensor) {
    let (_, lq) = m.attn.energies(m, q, &m.tau);
    let (_, lk) = m.attn.energies(m, k, &m.tau);
    if let Some(ls) = lams {
        ls.push(lk.detach());
    }
    (lq, lk)
}

// Tau attention on the model's path: the fused kernel, query chunks (--tau-chunk) or plain ops.
fn tau_attention_path(m: &Model, lq: &Tensor, lk: &Tensor, v: &Tensor, it: &Tensor) -> Tensor {
    if m.kernels == Kernels::Fused {
        tau_attention_fused(lq, lk, v, it)
    } else if m.tau_chunk > 0 {
        tau_attention_chunked(lq, lk, v, it, m.tau_chunk)
    } else {
        tau_attention(lq, lk, v, it)
    }
}

// A learned inverse temperature a head, log-parameterised.
fn learned_inv_temp(c: &ModelCfg) -> LayerTensor {
    LayerTensor { name: "log_inv_temp", shape: vec![c.n_head], init: c.inv_temp_init.ln(), trained: true }
}

// Causal scaled-dot-product attention: the speedrun's, flash kernels on CUDA.
struct Causal;
impl Attention for Causal {
    fn name(&self) -> &'static str {
        "causal"
    }
    fn about(&self) -> &'static str {
        "causal scaled-dot-product attention"
    }
    fn attend(
        &self,
        _: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        _: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let [k, v]: [Tensor; 2] =
            through_cache(cache, l, vec![k.shallow_clone(), v.shallow_clone()]).try_into().unwrap();
        sdpa(q, &k, &v, None)
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        2 * c.kv_heads() * c.head_dim() * cdt.elt_size_in_bytes() as i64
    }
    fn fused(&self) -> bool {
        true
    }
}

// Causal attention within the last --window keys: the non-topological control (a speedrun staple).
struct Sliding;
impl Attention for Sliding {
    fn name(&self) -> &'static str {
        "sliding"
    }
    fn about(&self) -> &'static str {
        "causal attention over the last --window keys (a non-topological control)"
    }
    fn check(&self, c: &ModelCfg) -> Res<()> {
        match c.window >= 1 {
            true => Ok(()),
            false => Err(format!("sliding: window {} must be ≥ 1; pass --window", c.window)),
        }
    }
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        _: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let [k, v]: [Tensor; 2] =
            through_cache(cache, l, vec![k.shallow_clone(), v.shallow_clone()]).try_into().unwrap();
        let (t, tk) = (q.size()[2], k.size()[2]);
        let i = Tensor::arange_start(tk - t, tk, (Kind::Int64, q.device())).unsqueeze(1); // the queries' positions
        let j = Tensor::arange(tk, (Kind::Int64, q.device())).unsqueeze(0);
        let seen = j.le_tensor(&i).logical_and(&j.gt_tensor(&(&i - m.cfg.window)));
        sdpa(q, &k, &v, Some(seen))
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        Causal.cache_bytes(c, cdt)
    }
    fn fused(&self) -> bool {
        false // SDPA with a mask: memory-efficient kernels, not flash
    }
}

// The Tauformer's attention: λ = E/(E+τ) of each head's q and k against an F×F L (F = head dim), logits
// −|λq − λk|·inv_temp; the cache holds λk and V. inv_temp fixed at 1/--tau-temp (tau, the public code's) or learned a
// head (tau-lt).
struct Tau {
    learned: bool,
}
impl Attention for Tau {
    fn name(&self) -> &'static str {
        if self.learned {
            "tau-lt"
        } else {
            "tau"
        }
    }
    fn about(&self) -> &'static str {
        if self.learned {
            "topological attention with a learned inverse temperature a head (init --inv-temp-init)"
        } else {
            "topological attention, fixed temperature (--tau-temp), as the public Tauformer code"
        }
    }
    fn laplacian_dim(&self, c: &ModelCfg) -> Option<i64> {
        Some(c.head_dim())
    }
    fn layer_tensors(&self, c: &ModelCfg) -> Vec<LayerTensor> {
        match self.learned {
            true => vec![learned_inv_temp(c)],
            false => vec![LayerTensor {
                name: "log_inv_temp",
                shape: vec![c.n_head],
                init: -c.tau_temp.ln(),
                trained: false,
            }],
        }
    }
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        lams: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let (lq, lk, v, it) = tau_inputs(m, l, q, k, v, cache, lams);
        tau_attention_path(m, &lq, &lk, &v, &it)
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        c.kv_heads() * (c.head_dim() * cdt.elt_size_in_bytes() as i64 + 4)
    }
    fn fused(&self) -> bool {
        true
    }
}

// The seed's other reading of a 6×64-head model on a 384-d manifold: one λ a token from the concatenated heads' q (and
// k) against a C×C L, shared by every head; learned inverse temperature a head. The cache holds one λk a token and V.
struct TauFull;
impl Attention for TauFull {
    fn name(&self) -> &'static str {
        "tau-full"
    }
    fn about(&self) -> &'static str {
        "topological attention, one λ a token from the whole C-d q/k on a C×C L, shared by the heads"
    }
    fn check(&self, c: &ModelCfg) -> Res<()> {
        match c.kv_heads() == c.n_head {
            true => Ok(()),
            false => Err(format!(
                "tau-full: λ of the whole key needs as many key heads as query heads (n_kv_head {}); drop --n-kv-head",
                c.n_kv_head
            )),
        }
    }
    fn laplacian_dim(&self, c: &ModelCfg) -> Option<i64> {
        Some(c.n_embd)
    }
    fn layer_tensors(&self, c: &ModelCfg) -> Vec<LayerTensor> {
        vec![learned_inv_temp(c)]
    }
    // x [B,H,T,D] → the token's whole vector [B,1,T,H·D] → (E, λ) [B,1,T]. In bf16 the C×C product x·L runs on tensor
    // cores (fp32 accumulation; fp32 from there on): in fp32 it was a third of the step.
    fn energies(&self, m: &Model, x: &Tensor, tau: &[f64]) -> (Tensor, Tensor) {
        let (b, h, t, d) = x.size4().unwrap();
        let w = x.transpose(1, 2).reshape([b, 1, t, h * d]);
        if w.kind() != Kind::BFloat16 {
            return taumode(&w, &m.lap, tau[0]);
        }
        let e = energy(&w.matmul(&m.lap.to_kind(Kind::BFloat16)).to_kind(Kind::Float), &w.to_kind(Kind::Float));
        let lam = &e / (&e + tau[0]);
        (e, lam)
    }
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        lams: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let (lq, lk, v, it) = tau_inputs(m, l, q, k, v, cache, lams);
        tau_attention_path(m, &lq.contiguous(), &lk.contiguous(), &v, &it)
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        c.kv_heads() * c.head_dim() * cdt.elt_size_in_bytes() as i64 + 4
    }
    fn fused(&self) -> bool {
        true // the tau kernel over λ expanded to the heads
    }
}

// r energies a head, one a spectral band of L (`bands_of`), each with its own τ; logits −Σ_r |λq_r − λk_r|·inv_temp,
// learned inverse temperature a head. The cache holds r λk's a key and V.
struct TauMulti;
impl Attention for TauMulti {
    fn name(&self) -> &'static str {
        "tau-multi"
    }
    fn about(&self) -> &'static str {
        "topological attention over --bands energies a head (spectral bands of L), logits −Σ|λq_r − λk_r|"
    }
    fn check(&self, c: &ModelCfg) -> Res<()> {
        match (1..=c.head_dim()).contains(&c.bands) {
            true => Ok(()),
            false => Err(format!(
                "tau-multi: bands {} must be within 1..={} (head dim); pass --bands",
                c.bands,
                c.head_dim()
            )),
        }
    }
    fn laplacian_dim(&self, c: &ModelCfg) -> Option<i64> {
        Some(c.head_dim())
    }
    fn bands(&self, c: &ModelCfg) -> i64 {
        c.bands
    }
    fn layer_tensors(&self, c: &ModelCfg) -> Vec<LayerTensor> {
        vec![learned_inv_temp(c)]
    }
    // (E, λ) [B, heads, T, r]: E_r = xᵀL_r x / (xᵀx + ε) over the bands L_r [r,F,F]
    fn energies(&self, m: &Model, x: &Tensor, tau: &[f64]) -> (Tensor, Tensor) {
        let xf = if x.kind() == Kind::Double { x.shallow_clone() } else { x.to_kind(Kind::Float) };
        let lap = if m.lap.dim() == 2 { m.lap.unsqueeze(0) } else { m.lap.shallow_clone() }; // one band: F×F
        let xl = Tensor::einsum("...f,rfg->...rg", &[&xf, &lap.to_kind(xf.kind())], None::<i64>); // x·L_r
        let e = energy(&xl, &xf.unsqueeze(-2)); // [.., r]
        let tau = Tensor::from_slice(tau).to_kind(xf.kind()).to(x.device());
        let lam = &e / (&e + tau);
        (e, lam)
    }
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        lams: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let (lq, lk, v, it) = tau_inputs(m, l, q, k, v, cache, lams);
        // Σ_r one band at a time: never a [B,H,Tq,Tk,r] tensor
        let dist = (0..m.cfg.bands)
            .map(|r| (lq.select(-1, r).unsqueeze(-1) - lk.select(-1, r).unsqueeze(-2)).abs())
            .reduce(|a, b| a + b)
            .unwrap();
        distance_attention(&dist, &v, &it)
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        c.kv_heads() * (c.head_dim() * cdt.elt_size_in_bytes() as i64 + 4 * c.bands)
    }
    fn fused(&self) -> bool {
        false
    }
}

// Causal dot-product attention plus the topological term as a prior: logits q·k/√D − α|λq − λk|, α learned a head
// from --inv-temp-init, as tau-lt's inverse temperature (λ's of a layer spread over a few hundredths at init, so a
// smaller α would start as no prior at all). The cache holds K, λk and V.
struct TauBias;
impl Attention for TauBias {
    fn name(&self) -> &'static str {
        "tau-bias"
    }
    fn about(&self) -> &'static str {
        "causal dot-product attention plus a learned per-head bias −α|λq − λk|"
    }
    fn laplacian_dim(&self, c: &ModelCfg) -> Option<i64> {
        Some(c.head_dim())
    }
    fn layer_tensors(&self, c: &ModelCfg) -> Vec<LayerTensor> {
        vec![LayerTensor { name: "alpha", shape: vec![c.n_head], init: c.inv_temp_init, trained: true }]
    }
    fn attend(
        &self,
        m: &Model,
        l: i64,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Cache>,
        lams: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let h = m.cfg.n_head;
        let (lq, lk) = lambdas(m, q, k, lams);
        let [k, lk, v]: [Tensor; 3] =
            through_cache(cache, l, vec![k.shallow_clone(), lk, v.shallow_clone()]).try_into().unwrap();
        let lk = to_heads(lk, h);
        let (t, tk, alpha) = (q.size()[2], k.size()[2], m.layer(l, "alpha"));
        let bias = if m.kernels == Kernels::Fused && q.kind() == Kind::BFloat16 {
            tau_bias_fused(&to_heads(lq, h), &lk, alpha)
        } else {
            let bias = (lq.unsqueeze(-1) - lk.unsqueeze(-2)).abs() * alpha.view([1, -1, 1, 1]).neg();
            if t == 1 {
                bias
            } else {
                bias.masked_fill(&future(t, tk, q.device()), f64::NEG_INFINITY)
            }
        };
        sdpa(q, &k, &v, Some(bias.to_kind(q.kind())))
    }
    fn cache_bytes(&self, c: &ModelCfg, cdt: Kind) -> i64 {
        c.kv_heads() * (2 * c.head_dim() * cdt.elt_size_in_bytes() as i64 + 4)
    }
    fn fused(&self) -> bool {
        true // the bias by kernels/tau_bias.cu; SDPA with a bias takes its memory-efficient kernels, not flash
    }
}

// r spectral bands of a symmetric L [F,F]: L = UΛUᵀ, eigenvalues ascending, split into r runs of F/r (the last takes
// the rest), L_b = U_b Λ_b U_bᵀ [r,F,F], so that Σ_b L_b = L and band b sees only its part of the spectrum.
// The chain L of the variant's size, in its bands (None without a Laplacian): bench's L, whose values do not change
// the cost, and the tests'.
fn chain_for(c: &ModelCfg) -> Option<Tensor> {
    let a = c.attention();
    a.laplacian_dim(c).map(|f| bands_of(&chain_laplacian(f), a.bands(c)))
}

fn bands_of(l: &Tensor, r: i64) -> Tensor {
    if r == 1 {
        return l.shallow_clone();
    }
    let f = l.size()[0];
    let (mu, u) = l.to_kind(Kind::Double).linalg_eigh("L");
    let bands: Vec<Tensor> = (0..r)
        .map(|b| {
            let (lo, hi) = (b * (f / r), if b + 1 == r { f } else { (b + 1) * (f / r) });
            let ub = u.narrow(1, lo, hi - lo);
            (&ub * mu.narrow(0, lo, hi - lo)).matmul(&ub.tr())
        })
        .collect();
    Tensor::stack(&bands, 0).to_kind(l.kind())
}

impl Model {
    // The model of `cfg` with the variant's Laplacian `lap` (shaped by `bands_of`; None without one), τ 1.0 a band
    // until calibrated.
    fn new(cfg: ModelCfg, dev: Device, cdt: Kind, lap: Option<Tensor>) -> Model {
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        assert!(c % cfg.n_head == 0 && cfg.head_dim() % 2 == 0, "n_embd must split into heads of even size (RoPE)");
        assert!(cfg.n_head % cfg.kv_heads() == 0, "query heads must split evenly over key/value heads");
        let attn = cfg.attention();
        assert_eq!(
            lap.is_some(),
            attn.laplacian_dim(&cfg).is_some(),
            "{}: a Laplacian iff the variant uses one",
            cfg.attn
        );
        // The weights are drawn on the CPU with the calls, in the order, of the reference's module constructors
        // (nn.Embedding's N(0,1); per block, nn.Linear's kaiming-uniform for qkv, o, fc, proj, the two output
        // projections then zeroed; wte redrawn at std 0.02), so that after tch::manual_seed(S) they are bit for bit
        // those of torch.manual_seed(S) in ref_train.py, on any device: a seed means the same run in both.
        let linear = |o: i64, i: i64| {
            let gain = (2.0 / (1.0 + 5f64.sqrt().powi(2))).sqrt(); // kaiming_uniform_(a=√5)
            let std = gain / (i as f64).sqrt();
            let bound = 3f64.sqrt() * std; // torch's own order of operations, to the last bit
            Tensor::empty([o, i], (Kind::Float, Device::Cpu)).uniform_(-bound, bound)
        };
        let mut wte = Tensor::empty([v, c], (Kind::Float, Device::Cpu));
        let _ = wte.normal_(0.0, 1.0);
        let (mut params, mut buffers) = (vec![], vec![]);
        for l in 0..cfg.n_layer {
            params.push((format!("blocks.{l}.attn.qkv"), linear(c + 2 * cfg.kv_heads() * cfg.head_dim(), c).to(dev)));
            let _ = linear(c, c); // drawn, then zero-initialised: the output projections
            params.push((format!("blocks.{l}.attn.o"), Tensor::zeros([c, c], (Kind::Float, dev))));
            params.push((format!("blocks.{l}.mlp.fc"), linear(4 * c, c).to(dev)));
            let _ = linear(c, 4 * c);
            params.push((format!("blocks.{l}.mlp.proj"), Tensor::zeros([c, 4 * c], (Kind::Float, dev))));
            for t in attn.layer_tensors(&cfg) {
                let x = (format!("blocks.{l}.attn.{}", t.name), Tensor::full(t.shape, t.init, (Kind::Float, dev)));
                if t.trained {
                    params.push(x)
                } else {
                    buffers.push(x)
                }
            }
        }
        let _ = wte.normal_(0.0, 0.02);
        params.insert(0, ("wte".to_string(), wte.to(dev)));
        let params = params.into_iter().map(|(n, p)| (n, p.set_requires_grad(true))).collect();
        let (cos, sin) = rope_tables(cfg.head_dim(), cfg.seq_len, dev);
        let lap = lap.map(|l| l.to(dev)).unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, dev)));
        let tau = if cfg.is_tau() { vec![1.0; attn.bands(&cfg) as usize] } else { vec![] };
        Model { cos, sin, cfg, attn, params, buffers, lap, tau, cdt, tau_chunk: 0, kernels: Kernels::Plain }
    }

    // The model a training run (or its bench) builds from its options: the attention path; τ 1.0 until calibrated.
    fn from_args(cfg: ModelCfg, a: &TrainArgs, dev: Device, cdt: Kind, lap: Option<Tensor>) -> Model {
        Model { tau_chunk: a.tau_chunk, kernels: a.kernels, ..Model::new(cfg, dev, cdt, lap) }
    }

    // The fixed tensors a checkpoint holds beside the parameters (ModelCfg::buffer_shapes' names).
    fn checkpoint_buffers(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        if self.cfg.is_tau() {
            v.push(("laplacian".into(), self.lap.shallow_clone()));
            v.push(("tau".into(), Tensor::from_slice(&self.tau).to_kind(Kind::Float)));
        }
        v
    }

    fn p(&self, name: &str) -> &Tensor {
        let mut all = self.params.iter().chain(&self.buffers);
        &all.find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}")).1
    }

    // Layer l's tensor of the variant (LayerTensor `name`).
    fn layer(&self, l: i64, name: &str) -> &Tensor {
        self.p(&format!("blocks.{l}.attn.{name}"))
    }

    fn w(&self, name: &str) -> Tensor {
        self.p(name).to_kind(self.cdt)
    }

    fn n_params(&self) -> i64 {
        self.params.iter().map(|(_, p)| p.numel() as i64).sum()
    }

    // q [B,H,T,D], k and v [B,Hkv,T,D] of layer l at positions pos..; q and k rotated and RMS-normed.
    // The qkv weight's rows: H heads of q, then Hkv of k, then Hkv of v, D rows a head.
    fn qkv(&self, l: i64, h: &Tensor, pos: i64) -> (Tensor, Tensor, Tensor) {
        let y = h.matmul(&self.w(&format!("blocks.{l}.attn.qkv")).tr());
        let (hq, hk) = (self.cfg.n_head, self.cfg.kv_heads());
        if self.kernels == Kernels::Fused {
            let (q, k, v) = rope_norm_fused(&y, &self.cos, &self.sin, hq, hk, pos);
            return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        }
        rope_norm(&y, &self.cos, &self.sin, hq, hk, pos)
    }

    // taumode's (E, λ) of q or k [B, heads, T, D] against this model's L. The kernel takes bf16 (fp32 stays on the
    // plain ops, which keep fp32 products).
    fn energies(&self, x: &Tensor, tau: f64) -> (Tensor, Tensor) {
        if self.kernels == Kernels::Fused && x.kind() == Kind::BFloat16 {
            taumode_fused(x, &self.lap, tau)
        } else {
            taumode(x, &self.lap, tau)
        }
    }

    // The residual stream's RMSNorm, cast to the compute dtype for the next projection.
    fn norm_in(&self, x: &Tensor) -> Tensor {
        if self.kernels == Kernels::Fused {
            rmsnorm_fused(x, self.cdt)
        } else {
            rms(x).to_kind(self.cdt)
        }
    }

    // A residual add and the RMSNorm after it: (x + y, rms(x + y) in `kind`), the next sublayer's input (the compute
    // dtype) or the final hidden states (fp32).
    fn add_norm(&self, x: &Tensor, y: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        if self.kernels == Kernels::Fused {
            return add_rmsnorm_fused(x, y, kind);
        }
        let s = x + y;
        let h = rms(&s).to_kind(kind);
        (s, h)
    }

    fn embed(&self, idx: &Tensor) -> Tensor {
        rms(&Tensor::embedding(self.p("wte"), idx, -1, false, false))
    }

    // Final hidden states [B,T,C] (fp32 residual stream). `lams` collects each layer's λk for diagnostics.
    fn hidden(&self, idx: &Tensor, lams: Option<&mut Vec<Tensor>>) -> Tensor {
        self.forward(idx, None, lams)
    }

    // The one forward pass. With a cache, idx holds the tokens after the cached prefix: their keys join the cache
    // (causal: K and V; tau: λk and V) and their queries attend over all of it.
    fn forward(&self, idx: &Tensor, mut cache: Option<&mut Cache>, mut lams: Option<&mut Vec<Tensor>>) -> Tensor {
        let (b, t, c) = (idx.size()[0], idx.size()[1], self.cfg.n_embd);
        assert!(self.cfg.n_layer >= 1, "a model has at least one layer");
        let pos = cache.as_ref().map_or(0, |c| c.len());
        assert!(pos + t <= self.cos.size()[0], "sequence longer than the RoPE table");
        let mut x = self.embed(idx);
        let mut h = self.norm_in(&x); // the next sublayer's input
        for l in 0..self.cfg.n_layer {
            let (q, k, v) = self.qkv(l, &h, pos);
            let y = self.attn.attend(self, l, &q, &k, &v, cache.as_deref_mut(), lams.as_deref_mut());
            let y = y.transpose(1, 2).reshape([b, t, c]);
            let (x1, h1) = self.add_norm(&x, &y.matmul(&self.w(&format!("blocks.{l}.attn.o")).tr()), self.cdt);
            let u = h1.matmul(&self.w(&format!("blocks.{l}.mlp.fc")).tr());
            let a = if self.kernels == Kernels::Fused { relu2_fused(&u) } else { u.relu().square() };
            let last = l + 1 == self.cfg.n_layer;
            (x, h) = self.add_norm(
                &x1,
                &a.matmul(&self.w(&format!("blocks.{l}.mlp.proj")).tr()),
                if last { Kind::Float } else { self.cdt },
            );
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        h // the last add_norm's: rms(x) in fp32
    }

    // Soft-capped fp32 logits through the tied embedding.
    fn logits(&self, x: &Tensor) -> Tensor {
        let z = x.to_kind(self.cdt).matmul(&self.w("wte").tr()).to_kind(Kind::Float);
        (z / SOFTCAP).tanh() * SOFTCAP
    }

    fn loss(&self, idx: &Tensor, tgt: &Tensor, red: Reduction) -> Tensor {
        let z = self.logits(&self.hidden(idx, None));
        z.view([-1, self.cfg.vocab_size]).cross_entropy_loss(&tgt.view([-1]), None::<Tensor>, red, -100, 0.0)
    }

    // The tied head over rows of hidden states h [N,C] (no graph), `rows` at a time, so that only one chunk of
    // logits exists at once: the summed loss and, when asked, its gradients by hand, d/dh [N,C] and d/dwte [V,C].
    // Plain: ATen ops over fp32 logits; fused: `softcap_ce_fused` over the compute-dtype logits, which become their
    // gradient.
    fn head_chunked(&self, h: &Tensor, y: &Tensor, rows: i64, grad: bool) -> (Tensor, Option<(Tensor, Tensor)>) {
        let (n, dev, w) = (h.size()[0], h.device(), self.w("wte").detach());
        let (mut total, mut dh, mut dw) =
            (Tensor::zeros([], (Kind::Float, dev)), vec![], Tensor::zeros([0], (Kind::Float, dev)));
        if grad {
            dw = Tensor::zeros([self.cfg.vocab_size, self.cfg.n_embd], (Kind::Float, dev));
        }
        tch::no_grad(|| {
            for r0 in (0..n).step_by(rows as usize) {
                let (hc, yc) = (h.narrow(0, r0, rows.min(n - r0)), y.narrow(0, r0, rows.min(n - r0)));
                let gz = if self.kernels == Kernels::Fused {
                    let mut z = hc.matmul(&w.tr());
                    total += softcap_ce_fused(&mut z, &yc, 1.0, grad).sum(Kind::Float);
                    grad.then_some(z)
                } else {
                    let yc = yc.unsqueeze(1);
                    let t = (hc.matmul(&w.tr()).to_kind(Kind::Float) / SOFTCAP).tanh(); // logits = SOFTCAP·t
                    let z = &t * SOFTCAP;
                    let lse = z.logsumexp([1i64], true);
                    total += (&lse - z.gather(1, &yc, false)).sum(Kind::Float);
                    // d(summed CE)/d(capped logit) = softmax − onehot; through the cap: × (1 − t²)
                    grad.then(|| {
                        let g = (z - lse).exp().scatter_add(
                            1,
                            &yc,
                            &Tensor::full([yc.size()[0], 1], -1.0, (Kind::Float, dev)),
                        );
                        (g * (t.square().neg() + 1.0)).to_kind(self.cdt)
                    })
                };
                if let Some(gz) = gz {
                    dh.push(gz.matmul(&w));
                    dw += gz.tr().matmul(&hc).to_kind(Kind::Float);
                }
            }
        });
        (total, grad.then(|| (Tensor::cat(&dh, 0), dw)))
    }

    // Rows a chunk of `head_chunked`, or None for plain autograd over `loss` (which keeps several B·T·V copies of the
    // logits): --head-chunk when set, FUSED_LOGIT_ROWS under --kernels fused.
    fn head_rows(&self, head_chunk: i64) -> Option<i64> {
        if head_chunk > 0 {
            Some(head_chunk)
        } else {
            (self.kernels == Kernels::Fused).then_some(FUSED_LOGIT_ROWS)
        }
    }

    // Accumulates the gradient of scale × (mean training loss) and returns the loss; the head by autograd or by hand
    // (`head_rows`).
    fn loss_backward(&self, idx: &Tensor, tgt: &Tensor, head_chunk: i64, scale: f64) -> Tensor {
        let Some(rows) = self.head_rows(head_chunk) else {
            let loss = self.loss(idx, tgt, Reduction::Mean);
            (&loss * scale).backward();
            return loss.detach();
        };
        let x = self.hidden(idx, None);
        let c = self.cfg.n_embd;
        let n = x.numel() as i64 / c;
        let (total, grads) =
            self.head_chunked(&x.detach().to_kind(self.cdt).view([-1, c]), &tgt.view([-1]), rows, true);
        let (dh, dw) = grads.unwrap();
        // Back through the trunk: ∂/∂x of Σ x·dh is dh. The head's own share of the tied weight's gradient goes in by
        // hand.
        (x.view([-1, c]) * dh.to_kind(x.kind())).sum(Kind::Float).multiply_scalar(scale / n as f64).backward();
        let mut g = self.p("wte").grad();
        let _ = g.g_add_(&(dw * (scale / n as f64)));
        total / n as f64
    }

    // τ = median energy E of block 0's keys on one batch (the 30M Tauformer run's calibration), a band each.
    fn calibrate_tau(&self, idx: &Tensor) -> Vec<f64> {
        tch::no_grad(|| {
            let (_, k, _) = self.qkv(0, &self.norm_in(&self.embed(idx)), 0);
            let r = self.tau.len() as i64;
            let e = self.attn.energies(self, &k, &vec![1.0; r as usize]).0;
            match r {
                1 => vec![e.median().double_value(&[])],
                _ => (0..r).map(|b| e.select(-1, b).median().double_value(&[])).collect(),
            }
        })
    }
}

// Mean loss per token over the val split (or its first `limit` tokens), in windows of seq_len, batch_size at a time.
// With several ranks each scores its own block of sequences and the sums are added up.
fn evaluate(m: &Model, val: &[u16], b: i64, limit: i64, head_chunk: i64, dist: Option<&Dist>) -> Res<f64> {
    let t = m.cfg.seq_len;
    let usable = if limit > 0 { val.len().min(limit as usize + 1) } else { val.len() };
    let n_seq = ((usable - 1) / t as usize) as i64;
    assert!(n_seq > 0, "val split shorter than one sequence");
    let dev = m.lap.device();
    let (first, mine) = dist.map_or((0, n_seq), |d| rank_rows(n_seq, d.rank, d.world));
    let total = tch::no_grad(|| {
        let mut total = Tensor::zeros([], (Kind::Float, dev));
        for s in (first..first + mine).step_by(b as usize) {
            let nb = b.min(first + mine - s);
            let lo = (s * t) as usize;
            let (x, y) = window(&val[lo..lo + (nb * t) as usize + 1], nb, t, dev);
            total += match m.head_rows(head_chunk) {
                Some(rows) => {
                    m.head_chunked(
                        &m.hidden(&x, None).to_kind(m.cdt).view([-1, m.cfg.n_embd]),
                        &y.view([-1]),
                        rows,
                        false,
                    )
                    .0
                }
                None => m.loss(&x, &y, Reduction::Sum),
            };
        }
        total
    });
    if let Some(d) = dist {
        d.all_reduce(std::slice::from_ref(&total), false)?;
        d.sync()?;
    }
    Ok(total.double_value(&[]) / (n_seq * t) as f64)
}

// λk percentiles per layer and the inverse temperatures, to watch for collapse.
fn tau_diagnostics(m: &Model, val: &[u16], b: i64, step: i64) -> Value {
    let t = m.cfg.seq_len;
    let nb = b.min(((val.len() - 1) / t as usize) as i64);
    let (x, _) = window(&val[..(nb * t) as usize + 1], nb, t, m.lap.device());
    let mut lams = vec![];
    let _ = tch::no_grad(|| m.hidden(&x, Some(&mut lams)));
    let q = |p: f64| -> Vec<f64> {
        lams.iter()
            .map(|l| {
                let flat = l.flatten(0, -1);
                let n = flat.numel() as i64;
                let sample = if n > 1 << 24 { flat.narrow(0, 0, 1 << 24) } else { flat }; // quantile's input limit
                round4(sample.quantile_scalar(p, None, false, "linear").double_value(&[]))
            })
            .collect()
    };
    // the variant's layer tensors a layer: inverse temperatures as themselves, not their logs
    let mut d = json!({"step": step, "lambda_p05": q(0.05), "lambda_p50": q(0.5), "lambda_p95": q(0.95)});
    for t in m.attn.layer_tensors(&m.cfg) {
        let (key, exp) = match t.name.strip_prefix("log_") {
            Some(k) => (k, true),
            None => (t.name, false),
        };
        let per_layer: Vec<Vec<f64>> = (0..m.cfg.n_layer)
            .map(|l| {
                let x = m.layer(l, t.name).detach();
                let x = if exp { x.exp() } else { x };
                Vec::<f64>::try_from(x.to(Device::Cpu).to_kind(Kind::Double)).unwrap().into_iter().map(round4).collect()
            })
            .collect();
        d[key] = json!(per_layer);
    }
    d
}

// Model FLOPs utilisation of one GPU at `tokens_per_s`: llm.c's 6N + 6·L·C·T FLOPs a token over the bf16 peak.
fn mfu(m: &Model, tokens_per_s: f64) -> f64 {
    let c = &m.cfg;
    round4(
        tokens_per_s * (6.0 * m.n_params() as f64 + 6.0 * (c.n_layer * c.n_embd * c.seq_len) as f64) / H100_BF16_PEAK,
    )
}

// τ as logs and summaries show it: one number, or a list of one a band.
fn tau_json(tau: &[f64]) -> Value {
    match tau {
        [t] => json!(t),
        _ => json!(tau),
    }
}

fn tau_text(tau: &[f64]) -> String {
    tau_json(tau).to_string()
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

// --------------------------------------------------------------------------------------------------------------------
// Optimizer: Muon for the 2-D hidden matrices, Adam for the embedding and scalars

// Orthogonalise G: X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation so A is the small Gram matrix.
// G may be a stack [k, rows, cols] of same-shaped matrices, each orthogonalised on its own in one batched pass.
fn newton_schulz(g: &Tensor, steps: i64, cdt: Kind) -> Tensor {
    let (a, b, c) = NS_COEFFS;
    let mut x = g.to_kind(cdt);
    x = &x / (x.norm_scalaropt_dim(2.0, [-2, -1], true) + 1e-7);
    let sz = g.size();
    let tall = sz[sz.len() - 2] > sz[sz.len() - 1];
    if tall {
        x = x.transpose(-2, -1);
    }
    for _ in 0..steps {
        let aa = x.matmul(&x.transpose(-2, -1));
        let bb = &aa * b + aa.matmul(&aa) * c;
        x = &x * a + bb.matmul(&x);
    }
    if tall { x.transpose(-2, -1) } else { x }.to_kind(g.kind())
}

struct Optim {
    muon: Vec<(Tensor, Tensor)>, // (param, momentum buffer)
    // Muon matrices by shape: (shape, their indices in `muon`, offset in the flat buffer)
    groups: Vec<(Vec<i64>, Vec<usize>, i64)>,
    adam: Vec<(Tensor, Tensor, Tensor)>, // (param, m, v)
    t: i64,
}

// Of k items split over `world` ranks in balanced contiguous blocks, rank r's (first, count).
fn block(k: usize, r: i64, world: i64) -> (usize, usize) {
    let (lo, hi) = (r as usize * k / world as usize, (r as usize + 1) * k / world as usize);
    (lo, hi - lo)
}

impl Optim {
    fn new(m: &Model) -> Optim {
        let mut o = Optim { muon: vec![], groups: vec![], adam: vec![], t: 0 };
        for (name, p) in &m.params {
            if p.dim() == 2 && name != "wte" {
                o.muon.push((p.shallow_clone(), p.zeros_like()));
            } else {
                o.adam.push((p.shallow_clone(), p.zeros_like(), p.zeros_like()));
            }
        }
        // The flat update buffer holds the matrices shape by shape, so that each rank's share of a shape is one slice.
        let mut by_shape: std::collections::BTreeMap<Vec<i64>, Vec<usize>> = Default::default();
        for (i, (p, _)) in o.muon.iter().enumerate() {
            by_shape.entry(p.size()).or_default().push(i);
        }
        let mut off = 0;
        for (shape, idx) in by_shape {
            let size = shape.iter().product::<i64>() * idx.len() as i64;
            o.groups.push((shape, idx, off));
            off += size;
        }
        o
    }

    // What a resumed run needs besides the weights and `t`, by name (shallow: copying into them restores them):
    // Muon's momentum buffers and Adam's moments, in the order of `muon` and `adam`, which Optim::new derives from
    // the model's parameters.
    fn state(&self) -> Vec<(String, Tensor)> {
        let muon = self.muon.iter().enumerate().map(|(i, (_, b))| (format!("muon.{i}.momentum"), b.shallow_clone()));
        let adam = self.adam.iter().enumerate().flat_map(|(i, (_, m1, m2))| {
            [(format!("adam.{i}.m"), m1.shallow_clone()), (format!("adam.{i}.v"), m2.shallow_clone())]
        });
        muon.chain(adam).collect()
    }

    // The flat update buffer's length.
    fn muon_numel(&self) -> i64 {
        self.muon.iter().map(|(p, _)| p.numel() as i64).sum()
    }

    // This rank's Muon updates, scaled, in one flat fp32 buffer of every matrix, shape by shape (zeros where another
    // rank owns it). Same-shaped matrices go through Newton–Schulz together (one batched pass a shape: 4 shapes, not 24
    // matrices, in the speedrun model), and momentum takes one multi-tensor launch a shape: the step is launch-bound,
    // not FLOP-bound.
    fn muon_updates(&mut self, a: &TrainArgs, lr_mult: f64, cdt: Kind, rank: i64, world: i64) -> Tensor {
        let flat = Tensor::zeros(
            [self.muon_numel()],
            (Kind::Float, self.muon.first().map_or(Device::Cpu, |(p, _)| p.device())),
        );
        for (shape, idx, off) in &self.groups {
            // each rank owns a contiguous block of every shape's matrices
            let (first, count) = block(idx.len(), rank, world);
            if count == 0 {
                continue;
            }
            let own = &idx[first..first + count];
            let grads: Vec<Tensor> = own.iter().map(|&i| self.muon[i].0.grad()).collect();
            let (gs, bufs): (Vec<&Tensor>, Vec<&Tensor>) =
                (grads.iter().collect(), own.iter().map(|&i| &self.muon[i].1).collect());
            foreach_lerp_(&bufs, &gs, 1.0 - a.muon_momentum);
            let nesterov = foreach_lerp(&gs, &bufs, a.muon_momentum);
            let (rows, cols) = (shape[0] as f64, shape[1] as f64);
            let u = newton_schulz(&Tensor::stack(&nesterov, 0), a.ns_steps, cdt)
                * (-a.lr_muon * lr_mult * (rows / cols).max(1.0).sqrt());
            let n = shape[0] * shape[1];
            let _ = flat.narrow(0, off + first as i64 * n, count as i64 * n).copy_(&u.reshape([-1]));
        }
        flat
    }

    // With several ranks (the gradients already averaged) each rank orthogonalises only its share of the matrices
    // (of each shape, a contiguous block), as modded-nanogpt shards them; one all-reduce of the flat update buffer
    // gives every rank all of them. Only the owner's momentum buffer is ever read, so the others' stay untouched.
    fn step(&mut self, a: &TrainArgs, lr_mult: f64, cdt: Kind, dist: Option<&Dist>) -> Res<()> {
        self.t += 1;
        let (rank, world) = dist.map_or((0, 1), |d| (d.rank, d.world));
        tch::no_grad(|| {
            let flat = self.muon_updates(a, lr_mult, cdt, rank, world);
            if let Some(d) = dist {
                // a sum: every slice has one owner, the rest add zeros
                d.all_reduce(std::slice::from_ref(&flat), false)?;
            }
            for (shape, idx, off) in &self.groups {
                let k = idx.len() as i64;
                let upd = flat.narrow(0, *off, k * shape[0] * shape[1]).view([k, shape[0], shape[1]]);
                let upds: Vec<Tensor> = (0..k).map(|j| upd.get(j)).collect();
                foreach_add_(
                    &idx.iter().map(|&i| &self.muon[i].0).collect::<Vec<_>>(),
                    &upds.iter().collect::<Vec<_>>(),
                );
            }
            let (b1, b2) = (a.adam_beta1, a.adam_beta2);
            let (bc1, bc2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
            for (p, m1, m2) in self.adam.iter_mut() {
                let g = p.grad();
                let _ = m1.lerp_(&g, 1.0 - b1);
                let _ = m2.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = m2.sqrt() / bc2.sqrt() + a.adam_eps;
                let _ = p.g_add_(&(&*m1 / denom * (-a.lr_adam * lr_mult / bc1)));
            }
            Ok(())
        })
    }
}

// One optimizer step on this rank's rows (x, y): micro-batches of --micro-batch rows accumulate the gradient of the
// mean loss, the ranks average it, then the update. Returns the mean loss, not yet read back (reading syncs the GPU).
fn train_step(
    m: &mut Model,
    opt: &mut Optim,
    x: &Tensor,
    y: &Tensor,
    a: &TrainArgs,
    lr_mult: f64,
    dist: Option<&Dist>,
) -> Res<Tensor> {
    let loss = gradients(m, x, y, a, dist)?;
    update(m, opt, a, lr_mult, dist)?;
    Ok(loss)
}

// The step's first half: this rank's gradients, then averaged over the ranks (with the loss).
fn gradients(m: &Model, x: &Tensor, y: &Tensor, a: &TrainArgs, dist: Option<&Dist>) -> Res<Tensor> {
    let loss = backward_micro_batches(m, x, y, a.micro_batch, a.head_chunk);
    average_gradients(m, &loss, dist)?;
    Ok(loss)
}

// The gradients and the loss, averaged over the ranks in place (queued: see Dist::sync); nothing on one process.
fn average_gradients(m: &Model, loss: &Tensor, dist: Option<&Dist>) -> Res<()> {
    if let Some(d) = dist {
        let mut ts: Vec<Tensor> = m.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        ts.push(loss.shallow_clone());
        d.all_reduce(&ts, true)?;
    }
    Ok(())
}

// The step's second half: the optimizer, then the gradients cleared.
fn update(m: &mut Model, opt: &mut Optim, a: &TrainArgs, lr_mult: f64, dist: Option<&Dist>) -> Res<()> {
    opt.step(a, lr_mult, m.cdt, dist)?;
    let grads: Vec<Tensor> = m.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    foreach_zero_(&grads.iter().collect::<Vec<_>>()); // in place, one launch
    Ok(())
}

// The gradient of the mean loss over the rows of (x, y), accumulated `micro` rows at a time (0: all at once).
fn backward_micro_batches(m: &Model, x: &Tensor, y: &Tensor, micro: i64, head_chunk: i64) -> Tensor {
    let rows = x.size()[0];
    let micro = if micro > 0 { micro.min(rows) } else { rows };
    let accum = rows / micro;
    assert!(accum * micro == rows, "--micro-batch must divide the rows of a rank");
    let mut loss = Tensor::zeros([], (Kind::Float, x.device()));
    for j in 0..accum {
        loss += m.loss_backward(
            &x.narrow(0, j * micro, micro),
            &y.narrow(0, j * micro, micro),
            head_chunk,
            1.0 / accum as f64,
        );
    }
    loss / accum as f64
}

// 50 warm-up steps, constant, then linear to 0 over the last cooldown_frac of the run (the reference's schedule).
fn lr_mult(a: &TrainArgs, i: i64) -> f64 {
    let cool = (a.steps as f64 * a.cooldown_frac) as i64;
    if i < a.steps - cool {
        ((i + 1) as f64 / a.warmup_steps.max(1) as f64).min(1.0)
    } else {
        ((a.steps - i) as f64 / cool as f64).max(0.0)
    }
}

// --------------------------------------------------------------------------------------------------------------------
// Several GPUs: one process per GPU, libtorch's c10d (TCPStore rendezvous, ProcessGroupNCCL), torchrun's variables

mod dist_ffi {
    use std::os::raw::{c_char, c_int, c_longlong, c_void};
    extern "C" {
        pub fn tg_dist_init(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: c_int,
            nccl: c_int,
            err: *mut c_char,
            errlen: usize,
        ) -> *mut c_void;
        pub fn tg_all_reduce(
            dist: *mut c_void,
            tensors: *const *mut c_void,
            n: c_int,
            op: c_int,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int; // at::Tensor*[]
        pub fn tg_dist_sync(dist: *mut c_void, keep: c_int, err: *mut c_char, errlen: usize) -> c_int;
        pub fn tg_dist_pending(dist: *mut c_void) -> c_int;
        pub fn tg_store_add(
            dist: *mut c_void,
            key: *const c_char,
            delta: c_longlong,
            wait_for: c_longlong,
            err: *mut c_char,
            errlen: usize,
        ) -> c_longlong;
        pub fn tg_dist_free(dist: *mut c_void);
    }
}

// This process's place in a multi-process run, from torchrun's variables (set by `--nproc` on one host).
#[derive(Debug, PartialEq)]
struct DistEnv {
    rank: i64,
    world: i64,
    local_rank: i64,
    addr: String,
    port: i64,
}

fn dist_env(get: impl Fn(&str) -> Option<String>) -> Res<Option<DistEnv>> {
    let num = |k: &str, default: Option<i64>| -> Res<i64> {
        match get(k) {
            Some(v) => {
                v.trim().parse().map_err(|_| format!("{k}={v:?} is not a number; set it to an integer or unset it"))
            }
            None => default.ok_or(format!(
                "{k} is unset but WORLD_SIZE is set; set RANK, WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) together"
            )),
        }
    };
    let world = match get("WORLD_SIZE") {
        None => return Ok(None),
        Some(_) => num("WORLD_SIZE", None)?,
    };
    let rank = num("RANK", None)?;
    if world < 1 || !(0..world).contains(&rank) {
        return Err(format!("RANK={rank} WORLD_SIZE={world}: need 0 ≤ RANK < WORLD_SIZE"));
    }
    let env = DistEnv {
        rank,
        world,
        local_rank: num("LOCAL_RANK", Some(rank))?,
        addr: get("MASTER_ADDR").unwrap_or("127.0.0.1".into()),
        port: num("MASTER_PORT", Some(29500))?,
    };
    Ok((world > 1).then_some(env))
}

struct Dist {
    ptr: *mut std::os::raw::c_void,
    rank: i64,
    world: i64,
    failed: std::cell::Cell<bool>, // after an error nobody waits for anybody on the way out
}

impl Dist {
    // Meets the other ranks at MASTER_ADDR:MASTER_PORT (rank 0 serves the store); with NCCL on CUDA also forms the
    // group.
    fn init(e: &DistEnv, timeout_s: f64, nccl: bool) -> Res<Dist> {
        let host = std::ffi::CString::new(e.addr.clone()).map_err(|_| "MASTER_ADDR holds a NUL byte".to_string())?;
        let (ptr, err) = ffi(|b, n| unsafe {
            dist_ffi::tg_dist_init(
                host.as_ptr(),
                e.port as i32,
                e.rank as i32,
                e.world as i32,
                (timeout_s * 1e3) as i32,
                nccl as i32,
                b,
                n,
            )
        });
        if ptr.is_null() {
            return Err(format!(
                "rank {}: rendezvous at {}:{} failed ({err}); check MASTER_ADDR/MASTER_PORT and that \
                all {} ranks start",
                e.rank, e.addr, e.port, e.world
            ));
        }
        Ok(Dist { ptr, rank: e.rank, world: e.world, failed: false.into() })
    }
    // In place over the ranks: average (avg) or sum, stream-ordered (the GPU waits, the CPU runs on). Read a result on
    // the host only after `sync`.
    fn all_reduce(&self, ts: &[Tensor], avg: bool) -> Res<()> {
        // tch's handle is the at::Tensor*
        let ptrs: Vec<*mut std::os::raw::c_void> = ts.iter().map(|t| t.as_ptr() as *mut _).collect();
        self.collective(ffi(|b, n| unsafe {
            dist_ffi::tg_all_reduce(self.ptr, ptrs.as_ptr(), ptrs.len() as i32, avg as i32, b, n)
        }))
    }
    // Until every all-reduce queued so far is done, or --dist-timeout: a rank that died or hangs surfaces here.
    fn sync(&self) -> Res<()> {
        self.sync_first(self.pending())
    }
    // The same for the `n` queued first (the previous step's, while this step's run on).
    fn sync_first(&self, n: usize) -> Res<()> {
        let keep = self.pending().saturating_sub(n) as i32;
        self.collective(ffi(|b, n| unsafe { dist_ffi::tg_dist_sync(self.ptr, keep, b, n) }))
    }
    // All-reduces queued and not yet waited for.
    fn pending(&self) -> usize {
        unsafe { dist_ffi::tg_dist_pending(self.ptr) as usize }
    }
    // An all-reduce call's (return code, error): after a failure nobody waits for anybody on the way out.
    fn collective(&self, (rc, err): (i32, String)) -> Res<()> {
        if rc != 0 {
            self.failed.set(true);
            return Err(format!(
                "rank {}: all-reduce failed ({err}); another rank died or hung, see its error",
                self.rank
            ));
        }
        Ok(())
    }
    // Every rank reaches `name` or, after the store's timeout, this one fails naming how many came.
    fn barrier(&self, name: &str) -> Res<()> {
        let key = std::ffi::CString::new(format!("barrier/{name}")).unwrap();
        let (v, err) = ffi(|b, n| unsafe { dist_ffi::tg_store_add(self.ptr, key.as_ptr(), 1, self.world, b, n) });
        if v < 0 {
            self.failed.set(true);
            return Err(format!("rank {}: barrier {name}: {err}; another rank died or hung, see its error", self.rank));
        }
        Ok(())
    }
    // Whether any rank says `yes` at `name`, the same answer on every rank: each adds 1, or 1 + world for yes, to one
    // store key and waits for a sum ≥ world. A sum over world means a yes has come in; one of exactly world, that
    // every rank came in with no.
    fn any(&self, name: &str, yes: bool) -> Res<bool> {
        let key = std::ffi::CString::new(format!("any/{name}")).unwrap();
        let delta = 1 + self.world * yes as i64;
        let (v, err) = ffi(|b, n| unsafe { dist_ffi::tg_store_add(self.ptr, key.as_ptr(), delta, self.world, b, n) });
        if v < 0 {
            self.failed.set(true);
            return Err(format!("rank {}: {name}: {err}; another rank died or hung, see its error", self.rank));
        }
        Ok(v > self.world)
    }
}

// Rank 0 serves the store, so it leaves last: it waits (up to the timeout) until every rank has checked out.
impl Drop for Dist {
    fn drop(&mut self) {
        let key = std::ffi::CString::new("exit").unwrap();
        let wait_for = if self.rank == 0 && !self.failed.get() { self.world } else { 0 };
        let _ = ffi(|b, n| unsafe { dist_ffi::tg_store_add(self.ptr, key.as_ptr(), 1, wait_for, b, n) });
        unsafe { dist_ffi::tg_dist_free(self.ptr) };
    }
}

// `--nproc N` on one host: start N copies of this command as ranks 0..N (torchrun's variables, a free port), pass rank
// 0's output through, and stop them all as soon as one fails, naming it. The ranks run in a process group of their
// own, so that a Ctrl-C reaches them once, through here: every SIGINT/SIGTERM is passed on to each rank, and ranks
// that end on it (128 + signal) end the launch with their code. Returns the exit code.
fn launch(nproc: i64) -> Res<i32> {
    catch_signals(true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free local port for the rendezvous: {e}"))?
        .port();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut kids = vec![];
    for r in 0..nproc {
        let mut c = std::process::Command::new(&exe);
        c.args(std::env::args().skip(1))
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
            // libtorch's store client logs a warning and a stack trace when a dead peer's socket resets; the rank's own
            // error already says it in one line
            c.env("TORCH_CPP_LOG_LEVEL", "ERROR");
        }
        if r > 0 {
            c.stdout(std::process::Stdio::null()); // rank 0 speaks for the run; errors still reach stderr
        }
        use std::os::unix::process::CommandExt;
        kids.push(c.process_group(0).spawn().map_err(|e| format!("cannot start rank {r}: {e}"))?);
    }
    let mut done = vec![false; kids.len()];
    let mut passed_on = 0;
    loop {
        let sig = stop_signal();
        while passed_on < SIGNALS.load(SeqCst) {
            for (k, _) in kids.iter().zip(&done).filter(|(_, &d)| !d) {
                unsafe { libc::kill(k.id() as i32, sig.unwrap()) };
            }
            passed_on += 1;
        }
        for (r, k) in kids.iter_mut().enumerate() {
            if done[r] {
                continue;
            }
            if let Some(st) = k.try_wait().map_err(|e| format!("rank {r}: {e}"))? {
                done[r] = true;
                if !st.success() && !sig.is_some_and(|s| st.code() == Some(128 + s)) {
                    for (o, other) in kids.iter_mut().enumerate() {
                        if !done[o] {
                            let _ = other.kill();
                            let _ = other.wait();
                        }
                    }
                    return Err(format!("rank {r} of {nproc} failed ({st}); stopped the other ranks"));
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(sig.map_or(0, |s| 128 + s));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

// A rendezvous of --nproc ranks and a barrier, without training: checks MASTER_ADDR/PORT, the launcher, and that a
// rank which never arrives (`--fail-rank`) stops the others with an error instead of a hang.
fn cmd_dist_check(a: &DistCheckArgs) -> Res<()> {
    let Some(e) = dist_env(|k| std::env::var(k).ok())? else {
        return Err("dist-check runs as a rank: start it with --nproc N (N ≥ 2) or torchrun's variables".into());
    };
    let d = Dist::init(&e, a.dist_timeout, false)?;
    if a.fail_rank == Some(e.rank) {
        std::process::exit(3); // dies after the rendezvous, before the barrier
    }
    d.barrier("check")?;
    println!("rank {}/{}: rendezvous and barrier ok", e.rank, e.world);
    Ok(())
}

// --------------------------------------------------------------------------------------------------------------------
// Logs: logs/<uuid>.txt = source, versions, config, data, step lines, peak memory, summary. Never overwritten.

struct Log {
    path: PathBuf,
    file: Option<fs::File>,
    silent: bool, // ranks other than 0: no file, no output
}

impl Log {
    fn create(dir: &Path) -> Res<Log> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}; pass a writable --log-dir", dir.display()))?;
        let path = dir.join(format!("{}.txt", uuid::Uuid::new_v4()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path.with_extension("txt.partial"))
            .map_err(|e| format!("{}: {e}; pass a writable --log-dir", dir.display()))?;
        Ok(Log { path, file: Some(file), silent: false })
    }
    fn silent() -> Log {
        Log { path: PathBuf::new(), file: None, silent: true }
    }
    // Everything logged is printed too.
    fn line(&mut self, s: &str) -> Res<()> {
        if !self.silent {
            println!("{s}");
        }
        self.quiet(s)
    }
    fn quiet(&mut self, s: &str) -> Res<()> {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = writeln!(f, "{s}") {
                return Err(self.kept(&e));
            }
        }
        Ok(())
    }
    // A log that cannot be written (a full disk) ends the run, its .partial kept for reading.
    fn kept(&mut self, e: &std::io::Error) -> String {
        self.file = None;
        let partial = self.path.with_extension("txt.partial");
        format!("{}; the log so far is kept there", io_error(&partial, "write the log", e))
    }
    fn finish(mut self) -> Res<PathBuf> {
        let f = self.file.as_ref().unwrap();
        if let Err(e) = f.sync_all().and_then(|_| fs::rename(self.path.with_extension("txt.partial"), &self.path)) {
            return Err(self.kept(&e));
        }
        self.file = None;
        Ok(self.path.clone())
    }
}

// A run that fails leaves no half-written log behind (but one the disk could not take: see `kept`).
impl Drop for Log {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(self.path.with_extension("txt.partial"));
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// The torch package the running process really loaded: <torch>/lib/libtorch_cpu.so sits beside <torch>/version.py.
fn libtorch_version() -> (String, String) {
    unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _: libc::size_t, out: *mut libc::c_void) -> libc::c_int {
        let name = std::ffi::CStr::from_ptr((*info).dlpi_name).to_string_lossy().to_string();
        if name.ends_with("libtorch_cpu.so") {
            *(out as *mut String) = name;
        }
        0
    }
    let mut lib = String::new();
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut lib as *mut String as *mut libc::c_void) };
    let py = Path::new(&lib)
        .parent()
        .and_then(Path::parent)
        .and_then(|d| fs::read_to_string(d.join("version.py")).ok())
        .unwrap_or_default();
    let field = |k: &str| {
        py.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_matches(|c| " ='\"".contains(c)).to_string())
            .unwrap_or("unknown".into())
    };
    (field("__version__"), field("cuda: Optional[str]"))
}

fn gpu_name(dev: Device) -> Option<String> {
    match dev {
        Device::Cuda(i) => sh("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader", &format!("--id={i}")]),
        _ => None,
    }
}

// The checkout this binary was built from, as it is at run time: its commit, its uncommitted changes (`git status
// --porcelain`, at most 20 paths) and whether the embedded files still equal its files (an edit without a rebuild makes
// them differ; the embedded files are what ran). At run time rather than from build.rs: a build script that reran on
// every commit or edit would recompile the kernels each time, and one that did not would log a stale commit.
fn git_state() -> [(&'static str, String); 3] {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| sh("git", &[&["-C", dir], args].concat());
    let dirty = git(&["status", "--porcelain"]).map_or("unknown".into(), |s| match s.lines().count() {
        0 => "clean".to_string(),
        n => {
            let shown: Vec<&str> = s.lines().take(20).map(str::trim).collect();
            format!("{n} paths: {}{}", shown.join(", "), if n > 20 { ", ..." } else { "" })
        }
    });
    let files = std::iter::once(&("train_gpt.rs", SOURCE)).chain(EMBEDDED_FILES);
    let same = files.map(|(p, text)| fs::read_to_string(Path::new(dir).join(p)).ok().map(|t| t == *text));
    let same = same.collect::<Option<Vec<bool>>>().map_or("unknown".into(), |v| v.iter().all(|&b| b).to_string());
    [
        ("git_commit", git(&["rev-parse", "HEAD"]).unwrap_or("unknown".into())),
        ("git_dirty", dirty),
        ("embedded_files_match_checkout", same),
    ]
}

// The command line as a shell would take it back.
fn command_line() -> String {
    let quote = |a: String| match a.chars().all(|c| c.is_ascii_alphanumeric() || "_-./:=,@+%".contains(c)) {
        true if !a.is_empty() => a,
        _ => format!("'{}'", a.replace('\'', "'\\''")),
    };
    std::env::args_os().map(|a| quote(a.to_string_lossy().into_owned())).collect::<Vec<_>>().join(" ")
}

fn write_header(log: &mut Log, dev: Device) -> Res<()> {
    log.quiet(SOURCE.trim_end())?;
    for (name, text) in EMBEDDED_FILES {
        log.quiet(&"-".repeat(40))?;
        log.quiet(&format!("# {name}"))?;
        log.quiet(text.trim_end())?;
    }
    log.quiet(&"=".repeat(100))?;
    for (k, v) in git_state() {
        log.line(&format!("{k}: {v}"))?;
    }
    log.line(&format!("command: {}", command_line()))?;
    log.line(&format!("cwd: {}", std::env::current_dir().map_or("unknown".into(), |d| d.display().to_string())))?;
    let (torch, cuda) = libtorch_version();
    log.line(&format!("rustc: {}", env!("TRAIN_GPT_RUSTC")))?;
    log.line(&format!("tch: {}", env!("TRAIN_GPT_TCH")))?;
    log.line(&format!("libtorch: {torch}"))?;
    log.line(&format!("cuda: {}", if dev.is_cuda() { cuda } else { "none".into() }))?;
    log.line(&format!("gpu: {}", gpu_name(dev).unwrap_or("none".into())))?;
    log.line(&format!("host_threads: {}", rayon::current_num_threads()))?;
    log.quiet("nvidia-smi:")?;
    log.quiet(&if dev.is_cuda() { sh("nvidia-smi", &[]).unwrap_or("none".into()) } else { "none".into() })?;
    log.quiet(&"=".repeat(100))?;
    Ok(())
}

// Options outside their domain, refused before anything runs (train and bench).
fn check_train_args(a: &TrainArgs, world: i64) -> Res<()> {
    let finite_ge0 = |x: f64| x.is_finite() && x >= 0.0;
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let unit = |x: f64| (0.0..1.0).contains(&x);
    for (ok, what) in [
        (a.steps > 0, "--steps must be > 0"),
        (a.batch_size > 0, "--batch-size must be ≥ 1"),
        (a.seq_len > 1, "--seq-len must be ≥ 2 (a token and its successor)"),
        (a.val_every > 0, "--val-every must be > 0"),
        (a.val_tokens >= 0, "--val-tokens must be ≥ 0 (0: the whole val split)"),
        ((0.0..=1.0).contains(&a.cooldown_frac), "--cooldown-frac must be in [0,1]"),
        (finite_ge0(a.lr_muon) && finite_ge0(a.lr_adam), "--lr-muon and --lr-adam must be finite and ≥ 0"),
        (
            unit(a.muon_momentum) && unit(a.adam_beta1) && unit(a.adam_beta2),
            "--muon-momentum, --adam-beta1 and --adam-beta2 must be in [0,1)",
        ),
        (a.adam_eps.is_finite() && a.adam_eps > 0.0, "--adam-eps must be > 0"),
        (a.target_val_loss.is_finite(), "--target-val-loss must be a finite loss"),
        (positive(a.tau_temp) && positive(a.inv_temp_init), "--tau-temp and --inv-temp-init must be > 0"),
        (a.tau.is_none_or(positive), "--tau must be > 0 (left out: calibrated)"),
        (a.tau_chunk >= 0 && a.head_chunk >= 0, "--tau-chunk and --head-chunk must be ≥ 0"),
        (a.n_layer >= 1 && a.n_head >= 1, "--n-layer and --n-head must be ≥ 1"),
        // the line above refuses --n-head 0
        (a.n_head < 1 || a.n_embd % a.n_head == 0, "--n-embd must be a multiple of --n-head"),
        (
            a.n_kv_head >= 0 && (a.n_kv_head == 0 || a.n_head % a.n_kv_head == 0),
            "--n-head must be a multiple of --n-kv-head",
        ),
        (a.batch_size % world == 0, "--batch-size must split evenly over the ranks"),
        (
            a.micro_batch >= 0 && (a.micro_batch == 0 || (a.batch_size / world) % a.micro_batch == 0),
            "--micro-batch must divide batch_size / ranks",
        ),
    ] {
        if !ok {
            return Err(format!("{what}; see train_gpt train --help"));
        }
    }
    // what the variant itself cannot run (--window, --bands, grouped heads)
    ModelCfg::from_args(a, &a.attn).check()
}

// --------------------------------------------------------------------------------------------------------------------
// Training

// SIGINT and SIGTERM: the first asks a run to stop at its next step boundary (it writes a checkpoint when
// checkpointing is on, and its log with status interrupted, then exits 128 + signal, as a shell reports a death by
// it); a second exits at once. The launcher passes every one on to its ranks instead (see `launch`).
static SIGNALS: AtomicI32 = AtomicI32::new(0); // caught so far
static FIRST_SIGNAL: AtomicI32 = AtomicI32::new(0);
static PASS_SIGNALS_ON: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = FIRST_SIGNAL.compare_exchange(0, sig, SeqCst, SeqCst);
    if SIGNALS.fetch_add(1, SeqCst) > 0 && !PASS_SIGNALS_ON.load(SeqCst) {
        unsafe { libc::_exit(128 + sig) }; // async-signal-safe, unlike std::process::exit
    }
}

fn catch_signals(pass_on: bool) {
    PASS_SIGNALS_ON.store(pass_on, SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

// The first SIGINT/SIGTERM caught, if any.
fn stop_signal() -> Option<i32> {
    (SIGNALS.load(SeqCst) > 0).then(|| FIRST_SIGNAL.load(SeqCst))
}

// Returns the signal that interrupted the run, if one did.
fn cmd_train(mut a: TrainArgs, m: &ArgMatches) -> Res<Option<i32>> {
    catch_signals(false);
    // --resume: the run's options (resolved: preset, threads, kernels) but those given here; its state further down
    let resume = a.resume.as_ref().map(|p| read_train_state(p)).transpose()?;
    let mut changed = Value::Null;
    if let Some((_, st, _)) = &resume {
        (a, changed) = resume_args(&a, m, &st.args)?;
    }
    let de = dist_env(|k| std::env::var(k).ok())?;
    let (rank, world_size) = de.as_ref().map_or((0, 1), |e| (e.rank, e.world));
    let dev = rank_device(&de, &a.device)?;
    if resume.is_none() {
        apply_preset(&mut a, m, dev.is_cuda());
    }
    a.threads = set_up_cpu(a.threads, dev);
    let cdt = compute_kind(&a.dtype, dev)?;
    check_train_args(&a, world_size)?;
    a.kernels = resolve_kernels(a.kernels, a.tau_chunk, dev, a.n_embd / a.n_head)?;
    if let (Some(path), 0) = (&a.save_checkpoint, rank) {
        check_output(path, "--save-checkpoint", a.overwrite)?;
    }
    let start = resume.as_ref().map_or(0, |(_, st, _)| st.step);
    if start > a.steps {
        return Err(format!("--steps {}: the checkpoint is at step {start}; pass --steps ≥ {start}", a.steps));
    }
    if let (true, 0) = (a.checkpoint_every > 0, rank) {
        check_checkpoint_dir(&a.checkpoint_dir, resume.as_ref().map(|(_, st, _)| (st.run.as_str(), st.step)))?;
    }
    let data = load_data(&a.data, a.vocab_size)?;
    if data.train.len() as i64 <= a.batch_size * a.seq_len + 1 {
        return Err(format!(
            "{}: {} train tokens is too few for batch {}×{}; lower --batch-size/--seq-len",
            a.data.display(),
            data.train.len(),
            a.batch_size,
            a.seq_len
        ));
    }
    // validation scores whole sequences of the val tokens it reads (see `evaluate`)
    let val_read = if a.val_tokens > 0 { data.val.len().min(a.val_tokens as usize + 1) } else { data.val.len() };
    if val_read as i64 <= a.seq_len {
        return Err(format!(
            "{}: too few val tokens ({val_read} of {} read, --val-tokens {}) for one sequence of --seq-len {}; pass \
            --val-tokens ≥ {} or 0 (the whole split), or a lower --seq-len",
            a.data.display(),
            data.val.len(),
            a.val_tokens,
            a.seq_len,
            a.seq_len
        ));
    }
    tch::manual_seed(a.seed);
    let cfg = ModelCfg::from_args(&a, &a.attn);
    let variant = cfg.attn.clone();
    let gpu = gpu_name(dev);
    let corpus = a.data.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or("data".into());
    let track = format!(
        "{corpus}_{world_size}x{}",
        gpu.as_deref().map(|g| g.trim_start_matches("NVIDIA ").replace(' ', "-")).unwrap_or("CPU".into())
    );
    // TrainArgs as resolved, and the keys only a run knows (tools.rs: CONFIG_EXTRA_KEYS)
    let mut config = serde_json::to_value(&a).unwrap();
    config["variant"] = json!(variant);
    config["track"] = json!(track);
    config["device"] = json!(format!("{dev:?}"));
    config["compute_dtype"] = json!(format!("{cdt:?}"));
    config["world_size"] = json!(world_size);
    if a.print_config {
        println!("config: {config}");
        return Ok(None);
    }
    let dist = match &de {
        Some(e) => Some(Dist::init(e, a.dist_timeout, true)?),
        None => None,
    };

    let mut log = if rank == 0 { Log::create(&a.log_dir)? } else { Log::silent() }; // rank 0 alone writes the log
    write_header(&mut log, dev)?;
    log.line(&format!("config: {config}"))?;
    log.line(&format!("data: {}", data.info))?;
    log.line(&format!("attention: {}", attention_line(&cfg, a.kernels, cdt)))?;
    // the run is its first log's: a resumed one names it, and so do its checkpoints
    let run = match &resume {
        Some((dir, st, sha)) => {
            let from = json!({"run": st.run, "log": st.log, "step": st.step, "from": dir.display().to_string(),
                "checkpoint_sha256": sha, "changed": changed,
                "same_train_gpt": st.train_gpt_sha256 == format!("{:x}", Sha256::digest(SOURCE))});
            log.line(&format!("resume: {from}"))?;
            st.run.clone()
        }
        None => log.path.file_stem().unwrap_or_default().to_string_lossy().to_string(),
    };

    // The timed region starts here: a tau run pays for its Laplacian and its τ calibration, but nobody for the CUDA
    // context, which the first device operation would otherwise create inside the clock.
    if dev.is_cuda() {
        let _ = Tensor::zeros([1], (Kind::Float, dev));
        sync(dev);
        reset_memory_peaks(dev);
    }
    let train_tokens = device_tokens(&data.train, dev);
    let t0 = Instant::now();
    let (mut model, mut opt, lap_ms, mut train_ms, mut time_to_target, mut final_val, mut val0) = match &resume {
        // the weights (with L and inverse temperatures), the optimizer and the clock as they were
        Some((dir, st, _)) => {
            assert_eq!(st.data_step, st.step, "a step's batch is train_batch(step)");
            let mut model = load_checkpoint(&dir.join(CKPT_TENSORS[0]), dev)?;
            if model.cfg != cfg {
                return Err(format!(
                    "--resume {}: its weights are of {}, its options of {}; the checkpoint is corrupt, pass another",
                    dir.display(),
                    json!(model.cfg),
                    json!(cfg)
                ));
            }
            (model.tau, model.cdt, model.tau_chunk, model.kernels) = (st.tau.clone(), cdt, a.tau_chunk, a.kernels);
            let mut opt = Optim::new(&model);
            load_optimizer(&mut opt, &dir.join(CKPT_TENSORS[1]), dev)?;
            opt.t = st.optim_t;
            (model, opt, st.laplacian_build_ms, st.train_ms, st.time_to_target_ms, st.final_val, st.val0)
        }
        None => {
            let attn = cfg.attention();
            let (lap, lap_ms) = match attn.laplacian_dim(&cfg) {
                Some(f) => {
                    let (l, stats) = build_laplacian(&a, f, &data, dev)?;
                    log.line(&format!("laplacian: {stats}"))?;
                    (Some(bands_of(&l, attn.bands(&cfg))), stats["build_ms"].as_f64())
                }
                None => (None, None),
            };
            let mut model = Model::from_args(cfg.clone(), &a, dev, cdt, lap);
            if cfg.is_tau() {
                model.tau = match a.tau {
                    Some(t) => vec![t; model.tau.len()],
                    // the whole batch on every rank
                    None => model.calibrate_tau(&train_batch(&train_tokens, 0, a.batch_size, a.seq_len, 0, 1).0),
                };
                log.line(&format!("tau: {}", tau_text(&model.tau)))?;
            }
            let opt = Optim::new(&model);
            sync(dev);
            (model, opt, lap_ms, t0.elapsed().as_secs_f64() * 1e3, None, None, None)
        }
    };
    let n_params = model.n_params();
    log.line(&format!("params: {n_params}"))?;

    let tokens_per_step = a.batch_size * a.seq_len;
    // steps done when the loop ends
    let mut done = a.steps;
    // Steps are queued one ahead, as in modded-nanogpt: step s's loss is read (checked, logged) once step s+1 is
    // queued, so the GPU never waits for the host between steps. Validation syncs, and pauses the clock: train_time is
    // exact there; a step line's is when the line is written, once the next step is queued.
    let mut clock = Instant::now();
    let mut lagged: Option<(i64, Readback)> = None;
    // what a diverged run may blame besides the learning rates
    let suspects = if cfg.is_tau() { "check --laplacian and --tau" } else { "check the data" };
    let step_line = |log: &mut Log, s: i64, rb: Readback, ms: f64| -> Res<()> {
        let lv = rb.wait();
        if !lv.is_finite() {
            return Err(format!(
                "step {}: train loss is {lv}; the run diverged, lower --lr-muon/--lr-adam or {suspects}",
                s + 1
            ));
        }
        let avg = ms / (s + 1) as f64;
        // steps left × step_avg: validation pauses not counted
        let eta = (a.steps - s - 1) as f64 * avg / 1e3;
        log.line(&format!(
            "step:{}/{} train_loss:{lv:.4} train_time:{ms:.0}ms step_avg:{avg:.2}ms eta:{eta:.1}s",
            s + 1,
            a.steps
        ))?;
        Ok(())
    };
    for step in start..=a.steps {
        let last = step == a.steps;
        // a resumed run's first step was validated before its checkpoint
        let val = (last || step % a.val_every == 0) && (step > start || resume.is_none());
        let every = a.checkpoint_every > 0 && step % a.checkpoint_every == 0;
        // A signal stops the run at a step boundary. Every rank must stop at the same one, and only some may have
        // caught it: several ranks agree (through the store) at validation and checkpoint steps only.
        let stop = !last
            && match &dist {
                None => stop_signal().is_some(),
                Some(d) => (val || every) && d.any(&format!("stop/{step}"), stop_signal().is_some())?,
            };
        let (val, save) = (val && !stop, a.checkpoint_every > 0 && step > start && (every || stop));
        if val || save || stop {
            if let Some((s, rb)) = lagged.take() {
                step_line(&mut log, s, rb, train_ms + clock.elapsed().as_secs_f64() * 1e3)?;
            }
            if let Some(d) = &dist {
                d.sync()?;
            }
            sync(dev);
            train_ms += clock.elapsed().as_secs_f64() * 1e3; // the clock is paused during validation and checkpoints
        }
        if val {
            let vl = evaluate(&model, &data.val, a.batch_size, a.val_tokens, a.head_chunk, dist.as_ref())?;
            if step == 0 && !vl.is_finite() {
                return Err(format!("step 0: val loss is {vl} before any training; {suspects}"));
            }
            // Logits are soft-capped, so a run can diverge with a finite loss: well above where it started, it has.
            let v0 = *val0.get_or_insert(vl);
            if !vl.is_finite() || vl > v0 + DIVERGED_BY {
                let what = match vl.is_finite() {
                    true => format!("val loss {vl:.4} is over {DIVERGED_BY} above its step-0 value {v0:.4}"),
                    false => format!("val loss is {vl}"),
                };
                return Err(format!("step {step}: {what}; the run diverged, lower --lr-muon/--lr-adam or {suspects}"));
            }
            final_val = Some(vl);
            if time_to_target.is_none() && vl <= a.target_val_loss {
                time_to_target = Some(train_ms);
            }
            log.line(&format!(
                "step:{step}/{} val_loss:{vl:.4} train_time:{:.0}ms step_avg:{:.2}ms",
                a.steps,
                train_ms,
                train_ms / step.max(1) as f64
            ))?;
            if cfg.is_tau() && rank == 0 {
                log.line(&format!("diag: {}", tau_diagnostics(&model, &data.val, a.batch_size, step)))?;
            }
        }
        if save && rank == 0 {
            let state = TrainState {
                format: CKPT_FORMAT.into(),
                run: run.clone(),
                log: log.path.file_stem().unwrap_or_default().to_string_lossy().to_string(),
                step,
                data_step: step,
                seed: a.seed,
                optim_t: opt.t,
                tau: model.tau.clone(),
                train_ms,
                time_to_target_ms: time_to_target,
                val0,
                final_val,
                laplacian_build_ms: lap_ms,
                train_gpt_sha256: format!("{:x}", Sha256::digest(SOURCE)),
                args: serde_json::to_value(&a).unwrap(),
                sha256: Default::default(),
            };
            let (dir, sha) = save_train_state(&a.checkpoint_dir, &model, &opt, state, a.keep_checkpoints)?;
            log.line(&format!("checkpoint_state: {} sha256:{sha}", dir.display()))?;
        }
        if val || save || stop {
            clock = Instant::now();
        }
        if stop {
            done = step;
            break;
        }
        if last {
            break;
        }
        let (x, y) = train_batch(&train_tokens, step, a.batch_size, a.seq_len, rank, world_size);
        let queued = dist.as_ref().map_or(0, |d| d.pending());
        let loss = train_step(&mut model, &mut opt, &x, &y, &a, lr_mult(&a, step), dist.as_ref())?;
        if let Some(d) = &dist {
            d.sync_first(queued)?; // the previous step's all-reduces, bounded by --dist-timeout
        }
        if let Some((s, rb)) = lagged.replace((step, Readback::start(&loss))) {
            step_line(&mut log, s, rb, train_ms + clock.elapsed().as_secs_f64() * 1e3)?;
        }
    }

    let peaks = memory_peaks(dev);
    if let Some((al, re)) = peaks {
        log.line(&format!("peak memory allocated: {al:.0} MiB reserved: {re:.0} MiB"))?;
    }
    let interrupted = (done < a.steps).then(|| stop_signal().unwrap());
    let steps_ms = train_ms - lap_ms.unwrap_or(0.0);
    let tokens_per_s = (done * tokens_per_step) as f64 / (steps_ms / 1e3);
    // Each rank's own rate, gathered by a sum over one slot a rank.
    let per_rank = Tensor::zeros([world_size], (Kind::Float, dev));
    let _ = per_rank
        .get(rank)
        .fill_(tokens_per_s * rank_rows(a.batch_size, rank, world_size).1 as f64 / a.batch_size as f64);
    if let Some(d) = &dist {
        d.all_reduce(std::slice::from_ref(&per_rank), false)?;
        d.sync()?;
    }
    if rank > 0 {
        return Ok(interrupted); // rank 0 writes the log, the sample and the checkpoint
    }
    if a.sample_tokens > 0 && interrupted.is_none() {
        let text = decode_ids(&generate(
            &model,
            &tokenizer().encode_ordinary("\n").into_iter().map(|x| x as i64).collect::<Vec<_>>(),
            a.sample_tokens,
            0.8,
            50,
            a.seed,
            true,
        )?)?;
        log.line(&format!("sample: {}", json!(text)))?;
    }
    if let (Some(path), None) = (&a.save_checkpoint, interrupted) {
        // the name was free at the start (check_output); if another run took it since, these weights go beside it,
        // named after this run's log
        let (stem, ext) = (path.file_stem().unwrap_or_default(), path.extension().unwrap_or_default());
        let id = log.path.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let beside = path.with_file_name(format!("{}.{id}.{}", stem.to_string_lossy(), ext.to_string_lossy()));
        let existing = if a.overwrite { Existing::Replace } else { Existing::Beside(&beside) };
        let (to, sha) = save_checkpoint(&model, path, existing)?;
        log.line(&format!("checkpoint: {} sha256:{sha}", to.display()))?;
    }
    let mfu = gpu.is_some().then(|| mfu(&model, tokens_per_s / world_size as f64));
    let per_rank: Vec<f64> = Vec::<f64>::try_from(per_rank.to(Device::Cpu).to_kind(Kind::Double))
        .unwrap()
        .into_iter()
        .map(f64::round)
        .collect();
    // interrupted: tools count the log as no whole run; resumed: the run's figures, its clock carried over
    let status = if interrupted.is_some() { "interrupted" } else { "completed" };
    let summary = json!({"status": status, "resumed_from_step": resume.is_some().then_some(start),
        "variant": variant, "track": track, "laplacian": cfg.is_tau().then(|| a.laplacian.clone()),
        "steps": done,
        "final_val_loss": final_val.map(round4), "target_val_loss": a.target_val_loss,
        "time_to_target_ms": time_to_target.map(|t| t.round()),
        "train_time_ms": train_ms.round(), "ms_per_step": round4(steps_ms / done as f64),
        "tokens_per_s": tokens_per_s.round(), "mfu": mfu,
        "peak_alloc_mib": peaks.map(|p| p.0.round()), "peak_reserved_mib": peaks.map(|p| p.1.round()),
        "world_size": world_size,
        "tokens_per_s_per_rank": per_rank, "micro_batch": a.micro_batch,
        "laplacian_build_ms": lap_ms, "tau": cfg.is_tau().then(|| tau_json(&model.tau)), "params": n_params});
    log.line(&format!("summary: {summary}"))?;
    if cfg.is_tau() && interrupted.is_none() {
        // the built L (its bands add up to it), with the log, only for a whole run
        let l = if model.lap.dim() == 3 { model.lap.sum_dim_intlist(0, false, Kind::Float) } else { model.lap.copy() };
        save_laplacian(&log.path.with_extension("laplacian.npy"), &l)?;
    }
    let path = log.finish()?;
    println!("log: {}", path.display());
    Ok(interrupted)
}

// Steady ms/step of the training step on random tokens (no data, no validation), per variant. Under --nproc N each
// rank times its share of the global batch, as in training, and rank 0 reports.
fn cmd_bench(b: BenchArgs, m: &ArgMatches) -> Res<()> {
    let de = dist_env(|k| std::env::var(k).ok())?;
    let (rank, world) = de.as_ref().map_or((0, 1), |e| (e.rank, e.world));
    let dev = rank_device(&de, &b.train.device)?;
    let mut a = b.train.clone();
    apply_preset(&mut a, m, dev.is_cuda());
    check_train_args(&a, world)?;
    if let (Some(out), 0) = (&b.out, rank) {
        check_output(out, "--out", true)?;
    }
    if let Some(dir) = &b.profile {
        check_output_dir(dir, "--profile")?;
    }
    a.threads = set_up_cpu(a.threads, dev);
    a.kernels = resolve_kernels(a.kernels, a.tau_chunk, dev, a.n_embd / a.n_head)?;
    let cdt = compute_kind(&a.dtype, dev)?;
    let gpu = gpu_name(dev);
    let dist = match &de {
        Some(e) => Some(Dist::init(e, a.dist_timeout, true)?),
        None => None,
    };
    let d = dist.as_ref();
    // the step's end on the host, as in training: the all-reduces done (bounded), then the GPU
    let done = || -> Res<()> {
        if let Some(d) = d {
            d.sync()?;
        }
        sync(dev);
        Ok(())
    };
    let rows_here = rank_rows(a.batch_size, rank, world).1;
    let mut rows = vec![];
    for attn in &b.variants {
        tch::manual_seed(a.seed);
        let cfg = ModelCfg::from_args(&a, attn);
        let variant = cfg.attn.clone();
        let lap = chain_for(&cfg);
        let mut model = Model::from_args(cfg, &a, dev, cdt, lap);
        let mut opt = Optim::new(&model);
        let x = Tensor::randint(a.vocab_size, [rows_here, a.seq_len], (Kind::Int64, dev));
        let y = Tensor::randint(a.vocab_size, [rows_here, a.seq_len], (Kind::Int64, dev));
        reset_memory_peaks(dev);
        let mut t0 = Instant::now();
        for i in 0..b.bench_warmup + b.bench_steps {
            if i == b.bench_warmup {
                done()?;
                t0 = Instant::now();
            }
            let queued = d.map_or(0, |d| d.pending());
            let _ = train_step(&mut model, &mut opt, &x, &y, &a, 1.0, d)?;
            if let Some(d) = d {
                d.sync_first(queued)?; // the previous step's, as in training
            }
        }
        done()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / b.bench_steps as f64;
        let tok_s = (a.batch_size * a.seq_len) as f64 / (ms / 1e3);
        // Where the step goes: the same steps again, synchronised after each phase. The syncs cost the overlap of the
        // phases, so the parts add up to a little more than ms_per_step.
        let mut phase_ms = [0.0; 3]; // forward+backward, gradient all-reduce, optimizer (its Muon all-reduce included)
        for _ in 0..b.bench_steps {
            let t = Instant::now();
            let loss = backward_micro_batches(&model, &x, &y, a.micro_batch, a.head_chunk);
            done()?;
            let t1 = Instant::now();
            average_gradients(&model, &loss, d)?;
            done()?;
            let t2 = Instant::now();
            update(&mut model, &mut opt, &a, 1.0, d)?;
            done()?;
            for (acc, dt) in phase_ms.iter_mut().zip([t1 - t, t2 - t1, t2.elapsed()]) {
                *acc += dt.as_secs_f64() * 1e3 / b.bench_steps as f64;
            }
        }
        if let Some(dir) = &b.profile {
            profiled(&dir.join(format!("{variant}_rank{rank}.json")), dev, || {
                for _ in 0..PROFILE_STEPS {
                    let _ = train_step(&mut model, &mut opt, &x, &y, &a, 1.0, d)?;
                    done()?;
                }
                Ok(())
            })?;
        }
        let row = json!({"impl": "rust", "attn": variant, "optimizer": "muon+adam", "batch": a.batch_size,
            "seq": a.seq_len,
            "world_size": world, "rows_per_rank": rows_here,
            "ms_per_step": round4(ms), "tokens_per_s": tok_s.round(),
            "mfu": gpu.is_some().then(|| mfu(&model, tok_s / world as f64)),
            "forward_backward_ms": round4(phase_ms[0]), "all_reduce_ms": round4(phase_ms[1]),
            "optimizer_ms": round4(phase_ms[2]),
            "peak_mem_mib": memory_peaks(dev).map(|p| p.0.round()), "device": format!("{dev:?}"), "gpu": gpu,
            "compute_dtype": format!("{cdt:?}"),
            "kernels": a.kernels, "tau_chunk": a.tau_chunk, "head_chunk": a.head_chunk});
        if rank == 0 {
            println!("{row}");
        }
        rows.push(row);
    }
    if let (Some(out), 0) = (&b.out, rank) {
        write_atomic(out, serde_json::to_string_pretty(&rows).unwrap().as_bytes(), Existing::Replace)?;
    }
    Ok(())
}

// --------------------------------------------------------------------------------------------------------------------
// Checkpoints (safetensors: names in the README, config in the metadata) and sampling

// The safetensors dtype of a tensor kind (the ones written here).
fn st_dtype(k: Kind) -> safetensors::Dtype {
    match k {
        Kind::Float => safetensors::Dtype::F32,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Double => safetensors::Dtype::F64,
        k => panic!("no safetensors dtype for {k:?}"),
    }
}

// Every tensor file is made here: named tensors, each in its own dtype, bit for bit, and string metadata.
fn safetensors_bytes(named: &[(String, Tensor)], meta: Option<(&str, String)>) -> Res<Vec<u8>> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>, Kind)> = named
        .iter()
        .map(|(n, t)| {
            let t = t.detach().to(Device::Cpu).contiguous();
            let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut b, t.numel());
            (n.clone(), b, t.size().iter().map(|&s| s as usize).collect(), t.kind())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, b, s, k)| (n.clone(), safetensors::tensor::TensorView::new(st_dtype(*k), s.clone(), b).unwrap()))
        .collect();
    let meta = meta.map(|(k, v)| std::collections::HashMap::from([(k.to_string(), v)]));
    safetensors::tensor::serialize(views, &meta).map_err(|e| format!("cannot serialize tensors ({e:?})"))
}

// Tensor `n` of a safetensors file, as `kind` of `shape` on `dev`, or what it is instead.
fn st_tensor(st: &safetensors::SafeTensors, n: &str, kind: Kind, shape: &[i64], dev: Device) -> Res<Tensor> {
    let v = st.tensor(n).map_err(|_| format!("tensor {n} missing"))?;
    let have: Vec<i64> = v.shape().iter().map(|&s| s as i64).collect();
    if v.dtype() != st_dtype(kind) || have != shape {
        return Err(format!("tensor {n} is {:?} {have:?}, expected {:?} {shape:?}", v.dtype(), st_dtype(kind)));
    }
    Ok(Tensor::from_data_size(v.data(), shape, kind).to(dev))
}

// Writes the weights whole or not at all; returns where they went and their sha256, which the log records.
fn save_checkpoint(m: &Model, path: &Path, existing: Existing) -> Res<(PathBuf, String)> {
    let named: Vec<(String, Tensor)> = m
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .chain(m.checkpoint_buffers())
        .map(|(n, t)| (n, t.to_kind(Kind::Float)))
        .collect();
    let bytes = safetensors_bytes(&named, Some(("config", serde_json::to_string(&m.cfg).unwrap())))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let to = write_atomic(path, &bytes, existing)?;
    Ok((to, format!("{:x}", Sha256::digest(&bytes))))
}

fn load_checkpoint(path: &Path, dev: Device) -> Res<Model> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| format!("{p}: {e}; pass a file written by --save-checkpoint"))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format!("{p}: not a safetensors file ({e:?})"))?;
    let cfg: ModelCfg = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("config"))
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or(format!("{p}: no train_gpt config in the metadata; pass a file written by --save-checkpoint"))?;
    cfg.check().map_err(|e| format!("{p}: {e}; pass a file written by --save-checkpoint"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{p}: not a safetensors file ({e:?}); pass a file written by --save-checkpoint"))?;
    // every tensor is checked against the config before the model is built
    let get = |n: &str, shape: &[i64]| -> Res<Tensor> {
        st_tensor(&st, n, Kind::Float, shape, dev).map_err(|e| {
            let cfg = serde_json::to_string(&cfg).unwrap();
            format!("{p}: {e} for its config {cfg}; pass a file written by --save-checkpoint")
        })
    };
    let cdt = compute_kind("auto", dev)?;
    let params = cfg.param_shapes().iter().map(|(n, s)| get(n, s)).collect::<Res<Vec<_>>>()?;
    let buffers = cfg.buffer_shapes().iter().map(|(n, s)| Ok((n.clone(), get(n, s)?))).collect::<Res<Vec<_>>>()?;
    let lap = buffers.iter().find(|(n, _)| n == "laplacian").map(|(_, t)| t.shallow_clone());
    let mut m = Model::new(cfg, dev, cdt, lap);
    for (n, t) in &buffers {
        match n.as_str() {
            "laplacian" => {}
            "tau" => m.tau = Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap(),
            _ => m.buffers.iter_mut().find(|(b, _)| b == n).unwrap().1 = t.shallow_clone(),
        }
    }
    for ((_, w), t) in m.params.iter_mut().zip(params) {
        *w = t.set_requires_grad(true); // trainable again, for --resume
    }
    Ok(m)
}

// A run's checkpoint, what --resume continues from: DIR/step_NNNNNN/ with model.safetensors (as --save-checkpoint
// writes it), optimizer.safetensors (Muon's momenta and Adam's moments, bit for bit in their dtype) and state.json
// (this). Training draws nothing from torch's generator after the weights are made (they come from the file), and
// the batch of a step is a function of the step, so step and seed are all the randomness and data position there is.
#[derive(Serialize, serde::Deserialize)]
struct TrainState {
    format: String, // CKPT_FORMAT
    run: String,    // the uuid of the run's first log, kept across resumes
    log: String,    // the uuid of the log of the process that wrote it
    step: i64,      // steps done
    data_step: i64, // the step of the next train_batch (the data loader's position)
    seed: i64,
    optim_t: i64,
    tau: Vec<f64>, // a band, exact: model.safetensors holds it as f32
    train_ms: f64,
    time_to_target_ms: Option<f64>,
    val0: Option<f64>,
    final_val: Option<f64>,
    laplacian_build_ms: Option<f64>,
    train_gpt_sha256: String,                           // of the source that wrote it
    args: Value,                                        // the run's options, resolved
    sha256: std::collections::BTreeMap<String, String>, // of the two tensor files
}

const CKPT_FORMAT: &str = "train_gpt checkpoint 1";
const CKPT_TENSORS: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];
// Options a resumed run may give other values than its checkpoint's: they change no step already taken.
const RESUME_MAY_CHANGE: &[&str] = &[
    "steps",
    "val_every",
    "target_val_loss",
    "log_dir",
    "checkpoint_every",
    "checkpoint_dir",
    "keep_checkpoints",
    "save_checkpoint",
    "sample_tokens",
    "threads",
    "dist_timeout",
];

// The step_NNNNNN checkpoints in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut v: Vec<(i64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let n = p.file_name()?.to_str()?.strip_prefix("step_")?;
            let step = n.parse().ok().filter(|_| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()));
            step.filter(|_| p.is_dir()).map(|s| (s, p))
        })
        .collect();
    v.sort();
    v
}

// Writes `state`'s checkpoint into `dir` whole or not at all (write_dir_atomic: a kill at any point leaves the earlier
// ones whole), then keeps the newest `keep`. Returns its folder and state.json's sha256, which names it in logs.
fn save_train_state(dir: &Path, m: &Model, opt: &Optim, mut state: TrainState, keep: i64) -> Res<(PathBuf, String)> {
    let out = dir.join(format!("step_{:06}", state.step));
    let sha = write_dir_atomic(&out, "--checkpoint-dir", |tmp| {
        let (_, model_sha) = save_checkpoint(m, &tmp.join(CKPT_TENSORS[0]), Existing::Refuse)?;
        let bytes = safetensors_bytes(&opt.state(), None)?;
        write_atomic(&tmp.join(CKPT_TENSORS[1]), &bytes, Existing::Refuse)?;
        state.sha256 = [(CKPT_TENSORS[0], model_sha), (CKPT_TENSORS[1], format!("{:x}", Sha256::digest(&bytes)))]
            .map(|(f, h)| (f.to_string(), h))
            .into();
        let json = serde_json::to_vec_pretty(&state).unwrap();
        write_atomic(&tmp.join("state.json"), &json, Existing::Refuse)?;
        // tests/cli.rs kills a run here, every file written, before the rename
        if std::env::var("TRAIN_GPT_TEST_STALL_CHECKPOINT").is_ok_and(|s| s == state.step.to_string()) {
            eprintln!("stalled before the rename of {}", out.display());
            std::thread::sleep(std::time::Duration::from_secs(600));
        }
        Ok(format!("{:x}", Sha256::digest(&json)))
    })?;
    let all = checkpoints(dir);
    for (_, old) in &all[..all.len().saturating_sub(keep as usize)] {
        let _ = fs::remove_dir_all(old);
    }
    // what killed writers left: one run writes here (check_checkpoint_dir), and not meanwhile (this is its only writer)
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("step_") && n.ends_with(".partial") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    Ok((out, sha))
}

// The checkpoint --resume names (a step_NNNNNN folder, its state.json, or a --checkpoint-dir: its newest), its state
// and state.json's sha256, after checking both tensor files against the sha256 that it holds.
fn read_train_state(path: &Path) -> Res<(PathBuf, TrainState, String)> {
    let dir = match path {
        p if p.is_file() => p.parent().unwrap_or(Path::new(".")).to_path_buf(),
        p if p.join("state.json").exists() => p.to_path_buf(),
        p => checkpoints(p).pop().map(|(_, d)| d).ok_or(format!(
            "--resume {}: no checkpoint there (step_NNNNNN/state.json); pass a --checkpoint-dir or one of its folders",
            p.display()
        ))?,
    };
    let d = dir.display();
    let json = fs::read(dir.join("state.json")).map_err(|e| format!("--resume {d}: state.json: {e}"))?;
    let state: TrainState = serde_json::from_slice(&json)
        .ok()
        .filter(|s: &TrainState| s.format == CKPT_FORMAT)
        .ok_or(format!("--resume {d}: state.json is not a {CKPT_FORMAT} (truncated or corrupt); pass another"))?;
    for f in CKPT_TENSORS {
        let bytes = fs::read(dir.join(f)).map_err(|e| format!("--resume {d}: {f}: {e}; pass another checkpoint"))?;
        if state.sha256.get(f) != Some(&format!("{:x}", Sha256::digest(&bytes))) {
            return Err(format!(
                "--resume {d}: {f} does not match its sha256 in state.json (truncated or corrupt); pass an earlier \
                checkpoint"
            ));
        }
    }
    Ok((dir, state, format!("{:x}", Sha256::digest(&json))))
}

// Muon's and Adam's buffers from a checkpoint's optimizer.safetensors (checked by read_train_state), in place.
fn load_optimizer(opt: &mut Optim, path: &Path, dev: Device) -> Res<()> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| format!("--resume {p}: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("--resume {p}: {e:?}"))?;
    for (n, t) in opt.state() {
        let saved = st_tensor(&st, &n, t.kind(), &t.size(), dev).map_err(|e| format!("--resume {p}: {e}"))?;
        tch::no_grad(|| t.shallow_clone().copy_(&saved));
    }
    Ok(())
}

// --resume: the checkpoint's options, but those given on this command line. One given with another value than the
// checkpoint's is refused unless RESUME_MAY_CHANGE lists it. Returns the options and what changed, {option: [was,
// now]}.
fn resume_args(a: &TrainArgs, m: &ArgMatches, saved: &Value) -> Res<(TrainArgs, Value)> {
    let mut now = serde_json::to_value(a).unwrap();
    let mut changed = serde_json::Map::new();
    for (k, v) in now.as_object_mut().unwrap() {
        let Some(was) = saved.get(k).filter(|_| k != "resume") else { continue };
        if m.value_source(k) != Some(clap::parser::ValueSource::CommandLine) {
            *v = was.clone();
        } else if v != was && RESUME_MAY_CHANGE.contains(&k.as_str()) {
            changed.insert(k.clone(), json!([was, v]));
        } else if v != was {
            return Err(format!(
                "--resume: --{} is {was} in the checkpoint but {v} here; leave it out, or start a new run",
                k.replace('_', "-")
            ));
        }
    }
    let mut args: TrainArgs =
        serde_json::from_value(now).map_err(|e| format!("--resume: the checkpoint's options do not parse ({e})"))?;
    args.overwrite = a.overwrite;
    Ok((args, Value::Object(changed)))
}

// --checkpoint-dir holds one run's checkpoints: a new run needs one without any; a resumed run one with its own run's,
// none past the step it resumes from (a future given up, which the newest-first --resume would otherwise pick).
fn check_checkpoint_dir(dir: &Path, resumed: Option<(&str, i64)>) -> Res<()> {
    check_output_dir(dir, "--checkpoint-dir")?;
    let d = dir.display();
    for (step, p) in checkpoints(dir) {
        let run = fs::read(p.join("state.json")).ok().and_then(|j| serde_json::from_slice::<TrainState>(&j).ok());
        match (resumed, run.map(|s| s.run)) {
            (Some((r, k)), Some(run)) if run == r && step <= k => {}
            (Some((r, k)), Some(run)) if run == r => {
                return Err(format!(
                    "--checkpoint-dir {d}: holds step {step}, past step {k} resumed from; resume from it, or pass \
                    another --checkpoint-dir"
                ))
            }
            _ => {
                return Err(format!(
                    "--checkpoint-dir {d}: holds another run's checkpoint {}; pass another folder (or --resume {d})",
                    p.display()
                ))
            }
        }
    }
    Ok(())
}

// Autoregressive sampling. Cached: the prompt fills the cache once, then each step runs one token; when the RoPE
// table is full the cache restarts from the last half context. Uncached: each step re-runs the last seq_len tokens.
fn generate(m: &Model, prompt: &[i64], n: i64, temperature: f64, top_k: i64, seed: i64, cached: bool) -> Res<Vec<i64>> {
    let mut rng = StdRng::seed_from_u64(seed as u64); // its own generator: the same sample on any device, any thread
    let dev = m.lap.device();
    let t = m.cfg.seq_len as usize;
    let mut ids = prompt.to_vec();
    let mut cache = Cache::new(m.cfg.n_layer, m.cfg.seq_len);
    tch::no_grad(|| {
        for _ in 0..n {
            let ctx: &[i64] = if !cached {
                &ids[ids.len().saturating_sub(t)..]
            } else if cache.len() == 0 || cache.len() as usize == t {
                cache = Cache::new(m.cfg.n_layer, m.cfg.seq_len);
                &ids[ids.len().saturating_sub(if ids.len() > t { t / 2 } else { t })..]
            } else {
                &ids[ids.len() - 1..]
            };
            let x = Tensor::from_slice(ctx).to(dev).unsqueeze(0);
            let h = m.forward(&x, cached.then_some(&mut cache), None);
            let z = m.logits(&h.narrow(1, -1, 1)).view([-1]);
            let z = z.narrow(0, 0, GPT2_VOCAB.min(m.cfg.vocab_size));
            let next = if temperature <= 0.0 {
                z.argmax(0, false).int64_value(&[])
            } else {
                let (v, i) = (&z / temperature).topk(top_k.min(z.size()[0]), 0, true, true);
                let p = Vec::<f64>::try_from(v.softmax(0, Kind::Double).to(Device::Cpu)).unwrap();
                let (u, mut acc) = (rng.gen::<f64>(), 0.0);
                let k = p
                    .iter()
                    .position(|&pi| {
                        acc += pi;
                        acc > u
                    })
                    .unwrap_or(p.len() - 1);
                i.int64_value(&[k as i64])
            };
            ids.push(next);
        }
    });
    Ok(ids[prompt.len()..].to_vec())
}

// Text of GPT-2 token ids. A sample may stop inside a character that its BPE tokens split (or hold a byte run no text
// has): those bytes print as U+FFFD rather than failing the run at its end.
fn decode_ids(ids: &[i64]) -> Res<String> {
    let bytes = tokenizer()
        .decode_bytes(&ids.iter().map(|&x| x as u32).collect::<Vec<_>>())
        .map_err(|e| format!("decode failed: {e:?}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn cmd_sample(a: &SampleArgs) -> Res<()> {
    for (ok, what) in [
        (a.top_k >= 1, "--top-k must be ≥ 1"),
        (a.temperature.is_finite() && a.temperature >= 0.0, "--temperature must be ≥ 0 (0: greedy)"),
        (a.tokens >= 0, "--tokens must be ≥ 0"),
    ] {
        if !ok {
            return Err(format!("{what}; see train_gpt sample --help"));
        }
    }
    let dev = pick_device(&a.device)?;
    let mut m = load_checkpoint(&a.checkpoint, dev)?;
    m.kernels = resolve_kernels(a.kernels, 0, dev, m.cfg.head_dim())?;
    let prompt: Vec<i64> = tokenizer().encode_ordinary(&a.prompt).into_iter().map(|x| x as i64).collect();
    if prompt.is_empty() {
        return Err("--prompt is empty after tokenization; pass some text".into());
    }
    print!("{}", a.prompt);
    println!("{}", decode_ids(&generate(&m, &prompt, a.tokens, a.temperature, a.top_k, a.seed, !a.no_cache)?)?);
    Ok(())
}

// --------------------------------------------------------------------------------------------------------------------
// main

fn main() {
    load_cuda_runtime();
    // modded-nanogpt's allocator setting: fewer fragmentation OOMs at no cost.
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
    // libtorch's C++ warnings come with stack traces; errors reach the user as one line of ours instead.
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        std::env::set_var("TORCH_CPP_LOG_LEVEL", "ERROR");
    }
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            let first =
                e.to_string().lines().next().unwrap_or("bad arguments").trim_start_matches("error: ").to_string();
            eprintln!("error: {first}; see train_gpt --help");
            std::process::exit(2);
        }
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // (ranks, the device option of a command whose ranks need a GPU each)
    let (nproc, device) = match &cli.cmd {
        Cmd::Train(a) => (a.nproc, Some(a.device.as_str())),
        Cmd::Bench(b) => (b.train.nproc, Some(b.train.device.as_str())),
        Cmd::DistCheck(a) => (a.nproc, None),
        _ => (1, None),
    };
    if nproc > 1 && std::env::var_os("WORLD_SIZE").is_none() {
        if let Some(err) = device.and_then(|d| ranks_device_error(d, nproc)) {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
        match launch(nproc) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
    let res = match cli.cmd {
        Cmd::Train(a) => cmd_train(a, matches.subcommand_matches("train").unwrap())
            .map(|sig| sig.into_iter().for_each(|s| std::process::exit(128 + s))),
        Cmd::Prepare(a) => cmd_prepare(&a),
        Cmd::Sample(a) => cmd_sample(&a),
        Cmd::Stats { logs, vs } => tools::cmd_stats(&logs, &vs),
        Cmd::Diff { a, b } => tools::parse_logs(&[a, b]).map(|l| println!("{}", tools::diff_report(&l[0], &l[1]))),
        Cmd::Plot { logs, out, train } => tools::parse_logs(&logs)
            .and_then(|l| tools::plot_svg(&l, &out, train, tools::RunLog::record))
            .map(|_| println!("wrote {}", out.display())),
        Cmd::Curves { logs, format } => {
            tools::parse_logs(&logs).map(|l| print!("{}", tools::curves(&l, format == CurveFormat::Json)))
        }
        Cmd::Race(a) => tools::cmd_race(&a, matches.subcommand_matches("race").unwrap()),
        Cmd::Reproduce { log, seeds, out, allow_source_diff } => {
            tools::cmd_reproduce(&log, seeds, out, allow_source_diff)
        }
        Cmd::Source { log, out } => tools::cmd_source(&log, &out),
        Cmd::RecordsTable { root, current } => tools::records_table(&root, current).map(|t| print!("{t}")),
        Cmd::Bench(a) => cmd_bench(a, matches.subcommand_matches("bench").unwrap()),
        Cmd::BenchDecode(a) => tools::cmd_bench_decode(&a),
        Cmd::DistCheck(a) => cmd_dist_check(&a),
        Cmd::HasCuda => std::process::exit(if tch::Cuda::is_available() { 0 } else { 1 }),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
#[path = "tests/unit/train.rs"]
mod tests;
