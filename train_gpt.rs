// train_gpt.rs: a NanoGPT-speedrun-style harness over libtorch (tch) that races ordinary causal attention against
// the Tauformer's topological ("tau") attention under one recipe. Read top to bottom: set-up, data, Laplacian,
// model, optimizer, training, records tooling, sampling, main, tests. Every log embeds this file verbatim.

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

const SOURCE: &str = include_str!("train_gpt.rs");
const KERNEL_FILES: &[(&str, &str)] = &[("kernels/ext.cpp", include_str!("kernels/ext.cpp")), ("kernels/tau_attn.cu", include_str!("kernels/tau_attn.cu")),
                                         ("kernels/softcap_ce.cu", include_str!("kernels/softcap_ce.cu")), ("kernels/block_ops.cu", include_str!("kernels/block_ops.cu")),
                                         ("kernels/mma_bf16.cuh", include_str!("kernels/mma_bf16.cuh")), ("kernels/launchers.h", include_str!("kernels/launchers.h"))];
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
// --kernels fused with --head-chunk 0: rows of B·T a cross-entropy kernel call takes. Bounds the bf16 logits to 1.6 GB
// at V 50304 (6.6 GB for all 64×1024 rows at once) while each of the 4 matmuls of a step stays large.
const FUSED_LOGIT_ROWS: i64 = 16384;
const RMS_EPS: f64 = f32::EPSILON as f64; // libtorch's rms_norm default for fp32 and bf16 alike (its fp32 opmath), which the fused kernels repeat
const PROFILE_STEPS: i64 = 3; // bench --profile: enough to see a steady step between two others

// ----------------------------------------------------------------------------------------------------------------
// Command line

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
    /// Tokenize JSON Lines ({"path","split","text"}, plain or .zst) or a folder/file of plain text into GPT-2 shards
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
    /// Differences between two runs: options, embedded source, val loss at matched steps, speed, memory
    Diff { a: PathBuf, b: PathBuf },
    /// Val loss against training time and step, one line per log, as SVG
    Plot {
        logs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The README records table, recomputed from the logs under ROOT (default records/)
    RecordsTable {
        #[arg(default_value = "records")]
        root: PathBuf,
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

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Preset {
    /// speedrun on CUDA, tiny on CPU
    Auto,
    /// the 30M linux-c recipe (every default below)
    Speedrun,
    /// a small model on the embedded tiny corpus, minutes on a 2-core CPU
    Tiny,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Attn {
    /// causal scaled-dot-product attention
    Causal,
    /// topological attention, fixed temperature (--tau-temp), as the public Tauformer code
    Tau,
    /// topological attention with a learned per-head inverse temperature (log-parameterised)
    TauLt,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kernels {
    /// tau attention and the head's cross-entropy through libtorch ops
    Plain,
    /// CUDA kernels (CUDA only): tau attention through kernels/tau_attn.cu (scores made on the fly, never stored) and
    /// the soft-capped cross-entropy and its gradient through kernels/softcap_ce.cu (over the bf16 logits, in place)
    Fused,
}

#[derive(clap::Args, Clone, Serialize, Debug)]
struct TrainArgs {
    /// Shard folder made by `train_gpt prepare`
    #[arg(long, default_value = "data/tokens/linux-c")]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    preset: Preset,
    #[arg(long, value_enum, default_value = "causal")]
    attn: Attn,
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
    /// tau-lt: initial inverse temperature of every head
    #[arg(long, default_value_t = 20.0)]
    inv_temp_init: f64,
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
    /// Sequences a rank runs at once; gradients accumulate over batch_size / (ranks × micro_batch) of them (0: all its rows)
    #[arg(long, default_value_t = 0)]
    micro_batch: i64,
    /// Seconds a rank waits for the others (rendezvous, all-reduce) before it fails
    #[arg(long, default_value_t = 60.0)]
    dist_timeout: f64,
    /// tau: attention this many query rows at a time, scores recomputed in the backward (0: all T×T scores at once)
    #[arg(long, default_value_t = 0)]
    tau_chunk: i64,
    /// How tau attention and the head's cross-entropy run (fused: CUDA kernels for both; CUDA only, not with --tau-chunk)
    #[arg(long, value_enum, default_value = "plain")]
    kernels: Kernels,
    /// Run the tied head and its gradient this many rows at a time (0: plain autograd over all B·T rows at once; under
    /// --kernels fused a fixed chunk that bounds the bf16 logits)
    #[arg(long, default_value_t = 0)]
    head_chunk: i64,
    /// Write the final weights as safetensors (names in the README)
    #[arg(long)]
    save_checkpoint: Option<PathBuf>,
    /// Tokens of a sample (temperature 0.8, top-k 50) printed and logged at the end (0: none)
    #[arg(long, default_value_t = 0)]
    sample_tokens: i64,
    #[arg(long, default_value = "logs")]
    log_dir: PathBuf,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// A .jsonl or .jsonl.zst file, a .txt file, or a folder of .txt files
    input: PathBuf,
    /// Output folder for train_NNNNNN.bin / val_NNNNNN.bin (must not hold shards yet)
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Variants to time, comma-separated (tau runs use the chain L: its values do not change the cost)
    #[arg(long, default_value = "causal,tau,tau-lt", value_delimiter = ',')]
    variants: Vec<Attn>,
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
    #[arg(long, value_enum, default_value_t = Kernels::Plain)]
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
    #[arg(long, value_enum, default_value_t = Kernels::Plain)]
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
    tiny!(data = PathBuf::from("data/tokens/tiny"), n_layer = 4, n_head = 4, n_embd = 128, seq_len = 64,
          batch_size = 8, steps = 200, warmup_steps = 20, val_every = 25, val_tokens = 4096, target_val_loss = 6.5,
          sample_tokens = 48, lap_tokens = 1_000_000, lap_k = 1024);
}

// One-line errors from here down: Result<_, String> carries "what is wrong; how to fix it".
type Res<T> = Result<T, String>;

fn pick_device(spec: &str) -> Res<Device> {
    let cuda = tch::Cuda::is_available();
    match spec {
        "auto" => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let i: i64 = s.strip_prefix("cuda:").unwrap_or("0").parse().map_err(|_| format!("--device {s}: bad index; use cuda or cuda:N"))?;
            if !cuda {
                return Err(format!("--device {s}: no CUDA device is usable here; pass --device cpu, or run on a GPU box with LD_LIBRARY_PATH=<torch>/lib"));
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

// CUDA exists for libtorch once libtorch_cuda.so is loaded. The c10d code links it today, but a build that drops it
// (tch links as-needed) would see no GPU, so load it, and the CUDA linear algebra beside it, by hand.
fn load_cuda_runtime() {
    for lib in ["libtorch_cuda.so\0", "libtorch_cuda_linalg.so\0"] {
        unsafe { libc::dlopen(lib.as_ptr() as *const libc::c_char, libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Data: GPT-2 token shards (256×int32 header: magic, version, n_tokens; then uint16 tokens)

fn tokenizer() -> tiktoken_rs::CoreBPE {
    tiktoken_rs::r50k_base().expect("tiktoken-rs embeds the r50k (GPT-2) ranks")
}

// Documents as (split, text). JSON Lines keep their split; plain text gets a deterministic held-out tail.
fn read_documents(input: &Path) -> Res<Vec<(String, String)>> {
    let name = input.to_string_lossy().to_string();
    if input.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(input).map_err(|e| format!("{name}: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!("{name}: no .txt files in this folder; pass a folder of .txt files or a .jsonl(.zst) file"));
        }
        let mut docs = vec![];
        for f in files {
            docs.extend(read_documents(&f)?);
        }
        return Ok(docs);
    }
    let mut raw = vec![];
    let file = fs::File::open(input).map_err(|e| format!("{name}: {e}; check the path"))?;
    if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut raw))
            .map_err(|e| format!("{name}: zstd decode failed ({e}); the file is corrupt or not zstd"))?;
    } else {
        std::io::BufReader::new(file).read_to_end(&mut raw).map_err(|e| format!("{name}: {e}"))?;
    }
    // Non-UTF-8 bytes become U+FFFD rather than failing the whole corpus.
    let text = String::from_utf8_lossy(&raw).into_owned();
    if name.ends_with(".jsonl") || name.ends_with(".jsonl.zst") {
        return text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| {
            let v: Value = serde_json::from_str(l).map_err(|e| format!("{name}:{}: bad JSON ({e}); each line must be {{\"path\",\"split\",\"text\"}}", i + 1))?;
            let split = v["split"].as_str().unwrap_or("train");
            let body = v["text"].as_str().ok_or(format!("{name}:{}: no \"text\" string; each line must be {{\"path\",\"split\",\"text\"}}", i + 1))?;
            if split != "train" && split != "val" {
                return Err(format!("{name}:{}: split {split:?}; use \"train\" or \"val\"", i + 1));
            }
            Ok((split.to_string(), body.to_string()))
        }).collect();
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
    let parts: Vec<Vec<u16>> = docs.par_iter().map(|d| {
        let mut t = vec![EOT];
        t.extend(bpe.encode_ordinary(d).into_iter().map(|x| {
            assert!(x < 65536, "GPT-2 ids fit in u16");
            x as u16
        }));
        t
    }).collect();
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
    write_atomic(path, &bytes)
}

// Write to a temporary beside the target, then rename: a crash never leaves a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Res<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).and_then(|_| fs::rename(&tmp, path)).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("{}: cannot write ({e}); check the folder exists and is writable", path.display())
    })
}

fn read_shard(path: &Path) -> Res<Vec<u16>> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| format!("{p}: {e}; run `train_gpt prepare` to make the shards"))?;
    if bytes.len() < HEADER_INTS * 4 {
        return Err(format!("{p}: {} bytes, shorter than the 1024-byte header; the shard is corrupt, re-run `train_gpt prepare`", bytes.len()));
    }
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if int(0) != SHARD_MAGIC {
        return Err(format!("{p}: magic {} is not {SHARD_MAGIC}; not a token shard, re-run `train_gpt prepare`", int(0)));
    }
    if int(1) != SHARD_VERSION {
        return Err(format!("{p}: version {} is not {SHARD_VERSION}; re-run `train_gpt prepare` with this harness", int(1)));
    }
    let n = int(2);
    let want = HEADER_INTS * 4 + 2 * n.max(0) as usize;
    if n < 0 || bytes.len() != want {
        return Err(format!("{p}: header says {n} tokens ({want} bytes) but the file has {} bytes; the shard is truncated or corrupt, re-run `train_gpt prepare`", bytes.len()));
    }
    Ok(bytes[HEADER_INTS * 4..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

fn shard_paths(dir: &Path, split: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{split}_")) && n.ends_with(".bin")))
        .collect();
    v.sort();
    v
}

fn cmd_prepare(a: &PrepareArgs) -> Res<()> {
    if !shard_paths(&a.out, "train").is_empty() || !shard_paths(&a.out, "val").is_empty() {
        return Err(format!("{}: already holds shards; remove them or pass another --out", a.out.display()));
    }
    let t0 = Instant::now();
    let docs = read_documents(&a.input)?;
    fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    for split in ["train", "val"] {
        let texts: Vec<&str> = docs.iter().filter(|(s, _)| s == split).map(|(_, t)| t.as_str()).collect();
        let tokens = tokenize(&texts);
        for (i, chunk) in tokens.chunks(SHARD_MAX_TOKENS).enumerate() {
            write_shard(&a.out.join(format!("{split}_{i:06}.bin")), chunk)?;
        }
        println!("{split}: {} documents, {} tokens", texts.len(), tokens.len());
    }
    println!("prepared {} in {:.1}s with {} threads", a.out.display(), t0.elapsed().as_secs_f64(), rayon::current_num_threads());
    Ok(())
}

struct Data {
    train: Vec<u16>,
    val: Vec<u16>,
    info: Value,
}

fn load_data(dir: &Path, vocab: i64) -> Res<Data> {
    let mut hash = Sha256::new();
    let mut shards = vec![];
    let mut load = |split: &str| -> Res<Vec<u16>> {
        let paths = shard_paths(dir, split);
        if paths.is_empty() {
            return Err(format!("{}: no {split}_*.bin shards; run `train_gpt prepare <corpus> --out {}`", dir.display(), dir.display()));
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

// ----------------------------------------------------------------------------------------------------------------
// Laplacian precompute (tau only): L is F×F with F = head dim; λ(x) = E/(E+τ), E = xᵀLx/(xᵀx+ε)

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
struct LapConfig { window: usize, n_tokens: usize, k_items: usize, dim: usize, eps: f64, topk: usize, p: f64, sigma: f64, seed: u64 }

impl Default for LapConfig {
    // eps/topk/p/σ are the shipped Tauformer manifold's graph parameters (manifold.json).
    fn default() -> Self {
        LapConfig { window: 4, n_tokens: 10_000_000, k_items: 4096, dim: 64, eps: 1.31, topk: 15, p: 1.8, sigma: 0.535, seed: 0 }
    }
}

#[derive(Debug, Clone)]
struct LapStats { build_ms: f64, nnz: i64 /* nonzeros of L incl. diagonal */, deg_min: i64, deg_max: i64 /* edges per node */, lambda2: f64, lambda_max: f64, connected: bool, n_components: i64 }

impl LapStats {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "build_ms": self.build_ms, "nnz": self.nnz, "deg_min": self.deg_min, "deg_max": self.deg_max,
            "lambda2": self.lambda2, "lambda_max": self.lambda_max, "connected": self.connected, "n_components": self.n_components })
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
    if cfg.dim < 2 { return bad(format!("dim={} is too small, need ≥ 2; set dim to the head dim", cfg.dim)); }
    if cfg.k_items < cfg.dim || cfg.k_items > LAP_MAX_K { return bad(format!("K={} out of range, need {} ≤ K ≤ {LAP_MAX_K}; set --lap-k in that range", cfg.k_items, cfg.dim)); }
    if cfg.window == 0 || n <= cfg.window { return bad(format!("window={} with {n} tokens, need window ≥ 1 and more tokens than the window; raise --lap-tokens or feed more data", cfg.window)); }
    if cfg.topk == 0 || !(cfg.eps > 0.0 && cfg.sigma > 0.0 && cfg.p > 0.0) || !(cfg.eps + cfg.sigma + cfg.p).is_finite() {
        return bad(format!("graph params topk={} eps={} σ={} p={} must all be positive and finite; fix the --lap-* flags", cfg.topk, cfg.eps, cfg.sigma, cfg.p));
    }
    // libtorch reports bad shapes/OOM by panicking; turn that into the one-line error the caller logs.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = tch::no_grad_guard();
        let toks = Tensor::from_slice(&tokens[..n].iter().map(|&t| t as i32).collect::<Vec<_>>()).to_device(device).to_kind(Kind::Int64);
        let cooc = lap_cooc(&toks, k, cfg.window as i64).map_err(|e| format!("corpus Laplacian: {e}"))?.to_kind(Kind::Float);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let items = lap_rsvd(&lap_ppmi(&cooc), f, &mut rng); // K×F, f64
        let centroids = lap_kmeans(&items, n_centroids, &mut rng); // X×F
        Ok(lap_feature_laplacian(&centroids, cfg))
    }))
    .unwrap_or_else(|e| {
        let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        bad(format!("libtorch failed on {device:?} ({}); retry on CPU or lower --lap-k/--lap-tokens", msg.lines().next().unwrap_or("?")))
    })
}

/// Symmetric ±window co-occurrence counts (K×K int64) among the K most frequent ids; rows ordered by frequency.
fn lap_cooc(toks: &Tensor, k: i64, window: i64) -> Result<Tensor, String> {
    let (n, dev) = (toks.size()[0], toks.device());
    let freq = toks.bincount(None::<Tensor>, LAP_VOCAB_U16);
    let distinct = i64::try_from(freq.gt(0).sum(Kind::Int64)).unwrap();
    if distinct < k { return Err(format!("only {distinct} distinct tokens in {n}, need K={k}; lower --lap-k")); }
    // Ties go to the lower id, so the item set never depends on the device's topk.
    let key = &freq * LAP_VOCAB_U16 + (LAP_VOCAB_U16 - 1) - Tensor::arange(LAP_VOCAB_U16, (Kind::Int64, dev));
    let ids = key.topk(k, 0, true, true).1;
    let remap = Tensor::full([LAP_VOCAB_U16], -1, (Kind::Int64, dev)).scatter(0, &ids, &Tensor::arange(k, (Kind::Int64, dev)));
    let item = remap.index_select(0, toks); // item index per token, −1 outside the top K
    // Per offset: pair index a·K+b counted by an integer bincount (exact, and deterministic on GPU unlike float index_add).
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
    // Box–Muller from the seeded RNG: same test matrix on every device (tch's randn has a global, device-specific generator).
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| ((-2.0 * (1.0 - rng.gen::<f64>()).ln()).sqrt() * (std::f64::consts::TAU * rng.gen::<f64>()).cos()) as f32)
        .collect();
    Tensor::from_slice(&v).view([rows, cols])
}

/// Randomised truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): returns U_r·diag(S_r), f64, on a's device.
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
    (x.square().sum_dim_intlist(1, true, Kind::Double) - x.matmul(&c.transpose(0, 1)) * 2.0 + c.square().sum_dim_intlist(1, false, Kind::Double)).clamp_min(0.0)
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
            w.iter().position(|&v| { acc += v; acc > r }).unwrap_or_else(|| w.iter().rposition(|&v| v > 0.0).unwrap()) as i64
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
        if prev.as_ref().is_some_and(|p| p.equal(&assign)) { break; }
        // one-hot matmul rather than index_add: float atomics would make GPU runs nondeterministic
        let m = assign.one_hot(n_c).to_kind(Kind::Double);
        let cnt = m.sum_dim_intlist(0, false, Kind::Double).unsqueeze(1);
        c = (m.transpose(0, 1).matmul(x) / cnt.clamp_min(1.0)).where_self(&cnt.gt(0.0), &c); // an empty cluster keeps its centroid
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
        if comp[s] { continue; }
        n_components += 1;
        let mut stack = vec![s];
        comp[s] = true;
        while let Some(i) = stack.pop() {
            for j in (0..f).filter(|&j| adj(i, j) && !comp[j]).collect::<Vec<_>>() { comp[j] = true; stack.push(j); }
        }
    }
    let lambda2 = eig.get(1).copied().unwrap_or(0.0);
    let connected = n_components == 1;
    if connected != (lambda2 > LAP_CONNECTED_TOL) {
        eprintln!("laplacian_stats: BFS says {n_components} component(s) but λ2={lambda2:.3e}; L is probably not a graph Laplacian (rows should sum to 0, off-diagonals ≤ 0)");
    }
    LapStats { build_ms, nnz: v.iter().filter(|&&x| x != 0.0).count() as i64, deg_min: deg.iter().copied().min().unwrap_or(0), deg_max: deg.iter().copied().max().unwrap_or(0),
        lambda2, lambda_max: eig.last().copied().unwrap_or(0.0), connected, n_components }
}

/// Minimal .npy reader (v1–v3 header, little-endian f4/f8, C order). tch's read_npy trusts the payload length, so check it here.
fn lap_read_npy(bytes: &[u8]) -> Result<Tensor, String> {
    let bad = |what: &str| Err(format!("{what}; write it with numpy.save(path, L.astype(np.float32))"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" { return bad("not a .npy file (bad magic bytes)"); }
    let (start, hlen) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 if bytes.len() >= 12 => (12, u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize),
        v => return bad(&format!("unsupported .npy version {v}")),
    };
    let Some(header) = bytes.get(start..start + hlen).and_then(|h| std::str::from_utf8(h).ok()) else { return bad("truncated .npy header") };
    let field = |key: &str| header.split(&format!("'{key}':")).nth(1).map(str::trim_start).unwrap_or("");
    let kind = match field("descr").split('\'').nth(1) {
        Some("<f4") => Kind::Float,
        Some("<f8") => Kind::Double,
        d => return bad(&format!("dtype {} unsupported, need little-endian float32/float64", d.unwrap_or("?"))),
    };
    if !field("fortran_order").starts_with("False") { return bad("Fortran-ordered array, need C order (np.ascontiguousarray)"); }
    let shape = field("shape").trim_start_matches('(').split(')').next().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty())
        .map(str::parse::<i64>).collect::<Result<Vec<_>, _>>();
    let Ok(shape) = shape else { return bad("unparseable shape in .npy header") };
    let data = &bytes[start + hlen..];
    let want = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
    if data.len() != want { return bad(&format!("payload is {} bytes but shape {shape:?} needs {want} (truncated or corrupt)", data.len())); }
    Tensor::f_from_data_size(data, &shape, kind).map_err(|e| format!("{e}"))
}

fn load_laplacian_file(path: &Path, dim: i64) -> Result<Tensor, String> {
    let p = path.display();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !path.is_file() { return Err(format!("Laplacian file {p}: not found; pass an existing .npy or .safetensors file")); }
    let t = match ext {
        "npy" => lap_read_npy(&std::fs::read(path).map_err(|e| format!("Laplacian file {p}: {e}; check permissions"))?).map_err(|e| format!("Laplacian file {p}: {e}"))?,
        "safetensors" => {
            let ts = Tensor::read_safetensors(path).map_err(|e| format!("Laplacian file {p}: not a valid safetensors file ({}); re-export it with safetensors.torch.save_file", format!("{e}").replace('\n', " ")))?;
            match ts.as_slice() {
                [(_, t)] => t.shallow_clone(),
                _ => return Err(format!("Laplacian file {p}: holds {} tensors, need exactly one; save only L", ts.len())),
            }
        }
        _ => return Err(format!("Laplacian file {p}: unknown extension '.{ext}'; use .npy or .safetensors")),
    };
    if t.size() != [dim, dim] { return Err(format!("Laplacian file {p}: shape {:?}, need [{dim}, {dim}] (head dim); rebuild L for this head dim", t.size())); }
    let t = t.to_kind(Kind::Float).contiguous();
    if !bool::try_from(t.isfinite().all()).unwrap() { return Err(format!("Laplacian file {p}: contains NaN/Inf; rebuild it")); }
    let scale = f64::try_from(t.abs().max()).unwrap().max(1.0);
    let asym = f64::try_from((&t - t.transpose(0, 1)).abs().max()).unwrap();
    if asym > LAP_SYM_TOL * scale { return Err(format!("Laplacian file {p}: not symmetric (max |L−Lᵀ| = {asym:.3e}); symmetrise it, e.g. (L+L.T)/2")); }
    Ok(t)
}

fn save_laplacian(path: &Path, l: &Tensor) -> Result<(), String> {
    let sz = l.size();
    if sz.len() != 2 || sz[0] != sz[1] { return Err(format!("save_laplacian {}: shape {sz:?} is not square; pass the F×F Laplacian", path.display())); }
    l.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().write_npy(path)
        .map_err(|e| format!("save_laplacian {}: {e}; check the directory exists and is writable", path.display()))
}

// ----------------------------------------------------------------------------------------------------------------
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
    attn: String, // causal | tau | tau-lt
}

impl ModelCfg {
    fn from_args(a: &TrainArgs, attn: Attn) -> ModelCfg {
        let attn = attn.to_possible_value().unwrap().get_name().to_string(); // the one-word variant: causal | tau | tau-lt
        ModelCfg { n_layer: a.n_layer, n_head: a.n_head, n_kv_head: a.n_kv_head, n_embd: a.n_embd, seq_len: a.seq_len, vocab_size: a.vocab_size, attn }
    }
    // Key/value heads (grouped-query attention when fewer than the query heads; each serves n_head / kv_heads of them).
    fn kv_heads(&self) -> i64 {
        if self.n_kv_head > 0 { self.n_kv_head } else { self.n_head }
    }
    fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }
    fn is_tau(&self) -> bool {
        self.attn != "causal"
    }
}

struct Model {
    cfg: ModelCfg,
    params: Vec<(String, Tensor)>, // fp32 master weights, in checkpoint order
    cos: Tensor,
    sin: Tensor,
    lap: Tensor,      // tau: F×F Laplacian (fp32); causal: empty
    tau: f64,         // tau: the global energy scale
    inv_temp: Tensor, // tau: [n_layer, H] fixed inverse temperature; tau-lt: unused
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
    let inv = Tensor::arange_start_step(0, d, 2, (Kind::Float, dev)).divide_scalar(d as f64).multiply_scalar(-ROPE_BASE.ln()).exp();
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
    let lap = lap.to_kind(xf.kind());
    let e = (xf.matmul(&lap) * &xf).sum_dim_intlist(-1, false, xf.kind()) / (xf.square().sum_dim_intlist(-1, false, xf.kind()) + LAMBDA_EPS);
    let lam = &e / (&e + tau);
    (e, lam)
}

// taumode through a CUDA kernel each way (kernels/block_ops.cu, on tensor cores): x [B, heads, T, D] bf16 → (E, λ) fp32,
// λ differentiable, E not (it only calibrates τ and feeds the diagnostics).
fn taumode_fused(x: &Tensor, lap: &Tensor, tau: f64) -> (Tensor, Tensor) {
    let mut out = [std::ptr::null_mut(); 2];
    ext_ok("taumode (fused)", ffi(|e, n| unsafe { ext::tg_taumode(handle(x), handle(lap), tau, LAMBDA_EPS, out.as_mut_ptr(), e, n) }));
    let [e, lam] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (e, lam)
}

// The same attention, `chunk` query rows at a time with the backward recomputing the scores (kernels/ext.cpp), so
// that at most chunk×T scores exist at once instead of T×T.
fn tau_attention_chunked(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor, chunk: i64) -> Tensor {
    ext_tensor("tau attention (chunked)", ffi(|e, n| unsafe { ext::tg_tau_attention(handle(lq), handle(lk), handle(v), handle(inv_temp), chunk, e, n) }))
}

// The same attention through the CUDA kernels of kernels/tau_attn.cu: the scores are made tile by tile in registers,
// fed to tensor cores and never stored; the backward recomputes them from λq, λk and each row's max and softmax norm. Memory
// O(B·H·T) beyond the inputs. λ and inv_temp fp32, head dim in FUSED_HEAD_DIMS. The kernel takes bf16 V (its products
// are bf16 tensor-core ops); fp32 V, which wants fp32 products, goes through the chunked path with F32_TAU_CHUNK rows.
// The output is a [B,H,Tq,D] view of [B,Tq,H,D] memory, as the output projection reads it.
fn tau_attention_fused(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor) -> Tensor {
    if v.kind() != Kind::BFloat16 {
        return tau_attention_chunked(lq, lk, v, inv_temp, F32_TAU_CHUNK);
    }
    ext_tensor("tau attention (fused)", ffi(|e, n| unsafe { ext::tg_tau_flash(handle(lq), handle(lk), handle(v), handle(inv_temp), e, n) }))
}

// Per-row losses (fp32 [N]) of the soft-capped logits SOFTCAP·tanh(z/SOFTCAP) against y [N] through the CUDA kernel of
// kernels/softcap_ce.cu; with grad, z [N,V] (bf16 or fp32, no graph) is overwritten with d(scale·Σ loss)/dz. A target
// outside [0, V) gives its row a NaN loss and gradient.
fn softcap_ce_fused(z: &mut Tensor, y: &Tensor, scale: f64, grad: bool) -> Tensor {
    ext_tensor("cross-entropy (fused)", ffi(|e, n| unsafe { ext::tg_softcap_ce(handle(z), handle(y), SOFTCAP, scale, grad as i32, e, n) }))
}

// RMSNorm of x (fp32 or bf16) over its last dim, written in `kind` (fp32 or bf16): rms(x).to_kind(kind) in one CUDA
// kernel each way (kernels/block_ops.cu).
fn rmsnorm_fused(x: &Tensor, kind: Kind) -> Tensor {
    let dtype = norm_out_dtype("rmsnorm (fused)", kind);
    ext_tensor("rmsnorm (fused)", ffi(|e, n| unsafe { ext::tg_rmsnorm(handle(x), dtype, RMS_EPS, e, n) }))
}

// The RMSNorm kernels' output dtype as the c10::ScalarType code kernels/ext.cpp takes: fp32 or bf16.
fn norm_out_dtype(what: &str, kind: Kind) -> i32 {
    match kind { Kind::Float => 6, Kind::BFloat16 => 15, k => panic!("{what}: output {k:?}; want fp32 or bf16") }
}

// The residual add and the next RMSNorm: (s = x + y, rms(s).to_kind(kind)) for the fp32 stream x and a branch y (fp32 or
// bf16), one CUDA kernel each way (kernels/block_ops.cu).
fn add_rmsnorm_fused(x: &Tensor, y: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let dtype = norm_out_dtype("add+rmsnorm (fused)", kind);
    let mut out = [std::ptr::null_mut(); 2];
    ext_ok("add+rmsnorm (fused)", ffi(|e, n| unsafe { ext::tg_add_rmsnorm(handle(x), handle(y), dtype, RMS_EPS, out.as_mut_ptr(), e, n) }));
    let [s, h] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (s, h)
}

// The qkv projection's output y [B,T,(H+2G)·D] → q [B,T,H,D], k and v [B,T,G,D]: q and k rotated (positions pos..)
// then RMS-normed per head, v copied; one CUDA kernel each way (kernels/block_ops.cu).
fn rope_norm_fused(y: &Tensor, cos: &Tensor, sin: &Tensor, h: i64, g: i64, pos: i64) -> (Tensor, Tensor, Tensor) {
    let mut out = [std::ptr::null_mut(); 3];
    ext_ok("rope+qk-norm (fused)", ffi(|e, n| unsafe { ext::tg_rope_norm(handle(y), handle(cos), handle(sin), h, g, pos, RMS_EPS, out.as_mut_ptr(), e, n) }));
    let [q, k, v] = out.map(|p| unsafe { Tensor::from_ptr(p as *mut _) });
    (q, k, v)
}

// max(u, 0)² in one CUDA kernel each way (kernels/block_ops.cu).
fn relu2_fused(u: &Tensor) -> Tensor {
    ext_tensor("relu² (fused)", ffi(|e, n| unsafe { ext::tg_relu2(handle(u), e, n) }))
}

// Multi-tensor updates (ATen's _foreach ops, which tch lacks): one launch for a list where a loop makes one a tensor.
fn handles(ts: &[&Tensor]) -> Vec<*mut std::os::raw::c_void> {
    ts.iter().map(|t| handle(t)).collect()
}

// a[i] ← lerp(a[i], b[i], w)
fn foreach_lerp_(a: &[&Tensor], b: &[&Tensor], w: f64) {
    let (ha, hb) = (handles(a), handles(b));
    ext_ok("foreach lerp_", ffi(|e, n| unsafe { ext::tg_foreach_lerp(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, w, std::ptr::null_mut(), e, n) }));
}

// lerp(a[i], b[i], w), new tensors
fn foreach_lerp(a: &[&Tensor], b: &[&Tensor], w: f64) -> Vec<Tensor> {
    let (ha, hb) = (handles(a), handles(b));
    let mut out = vec![std::ptr::null_mut(); ha.len()];
    ext_ok("foreach lerp", ffi(|e, n| unsafe { ext::tg_foreach_lerp(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, w, out.as_mut_ptr(), e, n) }));
    out.into_iter().map(|p| unsafe { Tensor::from_ptr(p as *mut _) }).collect()
}

// a[i] += b[i]
fn foreach_add_(a: &[&Tensor], b: &[&Tensor]) {
    let (ha, hb) = (handles(a), handles(b));
    ext_ok("foreach add_", ffi(|e, n| unsafe { ext::tg_foreach_add_(ha.as_ptr(), hb.as_ptr(), ha.len() as i32, e, n) }));
}

fn foreach_zero_(a: &[&Tensor]) {
    let ha = handles(a);
    ext_ok("foreach zero_", ffi(|e, n| unsafe { ext::tg_foreach_zero_(ha.as_ptr(), ha.len() as i32, e, n) }));
}

// tch's handle of a tensor is the at::Tensor* that kernels/ext.cpp takes.
fn handle(t: &Tensor) -> *mut std::os::raw::c_void {
    t.as_ptr() as *mut _
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

// Tau attention over scalars: logits −|λq(i) − λk(j)|·inv_temp, causal, softmax, then the full value vectors.
// It reads only (λk, V) of the keys, which is what a decoding cache would hold. Plain path: T×T scores in memory.
fn tau_attention(lq: &Tensor, lk: &Tensor, v: &Tensor, inv_temp: &Tensor) -> Tensor {
    let (tq, tk) = (lq.size()[2], lk.size()[2]);
    let att = -(lq.unsqueeze(-1) - lk.unsqueeze(-2)).abs() * inv_temp.view([1, -1, 1, 1]);
    // one decoding query sees every key: no mask to build
    let att = if tq == 1 { att } else { att.masked_fill(&Tensor::ones([tq, tk], (Kind::Bool, lq.device())).tril(tk - tq).logical_not(), f64::NEG_INFINITY) };
    att.softmax(-1, att.kind()).to_kind(v.kind()).matmul(v)
}

// Decoding cache, per layer (keys, values) along time, allocated once for `cap` tokens: causal holds K [B,Hkv,T,D];
// tau holds λk [B,Hkv,T] (fp32), the Tauformer's scalar key. Both hold V [B,Hkv,T,D].
struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
    cap: i64,
}

impl Cache {
    fn new(n_layer: i64, cap: i64) -> Cache {
        Cache { layers: (0..n_layer).map(|_| None).collect(), len: 0, cap }
    }
    // Tokens cached so far.
    fn len(&self) -> i64 {
        self.len
    }
    // Writes layer l's new keys and values after the cached ones; returns all of them (views, no copy).
    fn append(&mut self, l: i64, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (t, len, cap) = (v.size()[2], self.len, self.cap);
        assert!(len + t <= cap, "cache full: {len} + {t} tokens > capacity {cap}");
        let (ck, cv) = self.layers[l as usize].get_or_insert_with(|| {
            let grow = |x: &Tensor| { let mut sz = x.size(); sz[2] = cap; Tensor::zeros(sz.as_slice(), (x.kind(), x.device())) };
            (grow(&k), grow(&v))
        });
        ck.narrow(2, len, t).copy_(&k);
        cv.narrow(2, len, t).copy_(&v);
        (ck.narrow(2, 0, len + t), cv.narrow(2, 0, len + t))
    }
    // Called once every layer has appended the same t tokens.
    fn advance(&mut self, t: i64) {
        self.len += t;
    }
    // Bytes allocated (the whole capacity).
    fn bytes(&self) -> i64 {
        self.layers.iter().flatten().map(|(k, v)| (k.numel() * k.kind().elt_size_in_bytes() + v.numel() * v.kind().elt_size_in_bytes()) as i64).sum()
    }
}

impl Model {
    fn new(cfg: ModelCfg, dev: Device, cdt: Kind, lap: Option<Tensor>, tau: f64, tau_temp: f64, inv_temp_init: f64) -> Model {
        let (c, v, h) = (cfg.n_embd, cfg.vocab_size, cfg.n_head);
        assert!(c % h == 0 && cfg.head_dim() % 2 == 0, "n_embd must split into heads of even size (RoPE)");
        assert!(h % cfg.kv_heads() == 0, "query heads must split evenly over key/value heads");
        // The weights are drawn on the CPU with the calls, in the order, of the reference's module constructors
        // (nn.Embedding's N(0,1); per block, nn.Linear's kaiming-uniform for qkv, o, fc, proj, the two output projections
        // then zeroed; wte redrawn at std 0.02), so that after tch::manual_seed(S) they are bit for bit those of
        // torch.manual_seed(S) in ref_train.py, on any device: a seed means the same run in both.
        let linear = |o: i64, i: i64| {
            let gain = (2.0 / (1.0 + 5f64.sqrt().powi(2))).sqrt(); // kaiming_uniform_(a=√5)
            let std = gain / (i as f64).sqrt();
            let bound = 3f64.sqrt() * std; // torch's own order of operations, to the last bit
            Tensor::empty([o, i], (Kind::Float, Device::Cpu)).uniform_(-bound, bound)
        };
        let mut wte = Tensor::empty([v, c], (Kind::Float, Device::Cpu));
        let _ = wte.normal_(0.0, 1.0);
        let mut params = vec![];
        for l in 0..cfg.n_layer {
            params.push((format!("blocks.{l}.attn.qkv"), linear(c + 2 * cfg.kv_heads() * cfg.head_dim(), c).to(dev)));
            let _ = linear(c, c); // drawn, then zero-initialised: the output projections
            params.push((format!("blocks.{l}.attn.o"), Tensor::zeros([c, c], (Kind::Float, dev))));
            params.push((format!("blocks.{l}.mlp.fc"), linear(4 * c, c).to(dev)));
            let _ = linear(c, 4 * c);
            params.push((format!("blocks.{l}.mlp.proj"), Tensor::zeros([c, 4 * c], (Kind::Float, dev))));
            if cfg.attn == "tau-lt" {
                params.push((format!("blocks.{l}.attn.log_inv_temp"), Tensor::full([h], inv_temp_init.ln(), (Kind::Float, dev))));
            }
        }
        let _ = wte.normal_(0.0, 0.02);
        params.insert(0, ("wte".to_string(), wte.to(dev)));
        let params = params.into_iter().map(|(n, p)| (n, p.set_requires_grad(true))).collect();
        let (cos, sin) = rope_tables(cfg.head_dim(), cfg.seq_len, dev);
        let lap = lap.map(|l| l.to(dev)).unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, dev)));
        let inv_temp = Tensor::full([cfg.n_layer, h], 1.0 / tau_temp, (Kind::Float, dev));
        Model { cos, sin, cfg, params, lap, tau, inv_temp, cdt, tau_chunk: 0, kernels: Kernels::Plain }
    }

    // The model a training run (or its bench) builds from its options: temperatures and the attention path; τ 1.0
    // until calibrated.
    fn from_args(cfg: ModelCfg, a: &TrainArgs, dev: Device, cdt: Kind, lap: Option<Tensor>) -> Model {
        Model { tau_chunk: a.tau_chunk, kernels: a.kernels, ..Model::new(cfg, dev, cdt, lap, 1.0, a.tau_temp, a.inv_temp_init) }
    }

    fn p(&self, name: &str) -> &Tensor {
        &self.params.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}")).1
    }

    fn w(&self, name: &str) -> Tensor {
        self.p(name).to_kind(self.cdt)
    }

    fn n_params(&self) -> i64 {
        self.params.iter().map(|(_, p)| p.numel() as i64).sum()
    }

    fn layer_inv_temp(&self, l: i64) -> Tensor {
        if self.cfg.attn == "tau-lt" { self.p(&format!("blocks.{l}.attn.log_inv_temp")).exp() } else { self.inv_temp.get(l) }
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
        if self.kernels == Kernels::Fused && x.kind() == Kind::BFloat16 { taumode_fused(x, &self.lap, tau) } else { taumode(x, &self.lap, tau) }
    }

    // The residual stream's RMSNorm, cast to the compute dtype for the next projection.
    fn norm_in(&self, x: &Tensor) -> Tensor {
        if self.kernels == Kernels::Fused { rmsnorm_fused(x, self.cdt) } else { rms(x).to_kind(self.cdt) }
    }

    // A residual add and the RMSNorm after it: (x + y, rms(x + y) in `kind`), the next sublayer's input (the compute
    // dtype) or the final hidden states (fp32).
    fn add_norm(&self, x: &Tensor, y: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        if self.kernels == Kernels::Fused { return add_rmsnorm_fused(x, y, kind) }
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
            let y = if self.cfg.is_tau() {
                let (_, lq) = self.energies(&q, self.tau);
                let (_, lk) = self.energies(&k, self.tau);
                if let Some(ls) = lams.as_deref_mut() {
                    ls.push(lk.detach());
                }
                let (lk, v) = match cache.as_deref_mut() { Some(c) => c.append(l, lk, v), None => (lk, v) };
                let group = self.cfg.n_head / self.cfg.kv_heads(); // query heads a key/value head serves
                let (lk, v) = if group > 1 { (lk.repeat_interleave_self_int(group, 1, None), v.repeat_interleave_self_int(group, 1, None)) } else { (lk, v) };
                let it = self.layer_inv_temp(l);
                if self.kernels == Kernels::Fused {
                    tau_attention_fused(&lq, &lk, &v, &it)
                } else if self.tau_chunk > 0 {
                    tau_attention_chunked(&lq, &lk, &v, &it, self.tau_chunk)
                } else {
                    tau_attention(&lq, &lk, &v, &it)
                }
            } else {
                let (k, v) = match cache.as_deref_mut() { Some(c) => c.append(l, k, v), None => (k, v) };
                let tk = k.size()[2];
                // is_causal aligns the mask top-left; queries after a cached prefix need it bottom-right. One new query
                // sees every key: no mask, so SDPA keeps its fused kernels while decoding.
                let mask = (tk > t && t > 1).then(|| Tensor::ones([t, tk], (Kind::Bool, q.device())).tril(tk - t));
                Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, tk == t, None, self.cfg.kv_heads() < self.cfg.n_head)
            };
            let y = y.transpose(1, 2).reshape([b, t, c]);
            let (x1, h1) = self.add_norm(&x, &y.matmul(&self.w(&format!("blocks.{l}.attn.o")).tr()), self.cdt);
            let u = h1.matmul(&self.w(&format!("blocks.{l}.mlp.fc")).tr());
            let a = if self.kernels == Kernels::Fused { relu2_fused(&u) } else { u.relu().square() };
            let last = l + 1 == self.cfg.n_layer;
            (x, h) = self.add_norm(&x1, &a.matmul(&self.w(&format!("blocks.{l}.mlp.proj")).tr()), if last { Kind::Float } else { self.cdt });
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
    // Plain: ATen ops over fp32 logits; fused: `softcap_ce_fused` over the compute-dtype logits, which become their gradient.
    fn head_chunked(&self, h: &Tensor, y: &Tensor, rows: i64, grad: bool) -> (Tensor, Option<(Tensor, Tensor)>) {
        let (n, dev, w) = (h.size()[0], h.device(), self.w("wte").detach());
        let (mut total, mut dh, mut dw) = (Tensor::zeros([], (Kind::Float, dev)), vec![], Tensor::zeros([0], (Kind::Float, dev)));
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
                        let g = (z - lse).exp().scatter_add(1, &yc, &Tensor::full([yc.size()[0], 1], -1.0, (Kind::Float, dev)));
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
        if head_chunk > 0 { Some(head_chunk) } else { (self.kernels == Kernels::Fused).then_some(FUSED_LOGIT_ROWS) }
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
        let (total, grads) = self.head_chunked(&x.detach().to_kind(self.cdt).view([-1, c]), &tgt.view([-1]), rows, true);
        let (dh, dw) = grads.unwrap();
        // Back through the trunk: ∂/∂x of Σ x·dh is dh. The head's own share of the tied weight's gradient goes in by hand.
        (x.view([-1, c]) * dh.to_kind(x.kind())).sum(Kind::Float).multiply_scalar(scale / n as f64).backward();
        let mut g = self.p("wte").grad();
        let _ = g.g_add_(&(dw * (scale / n as f64)));
        total / n as f64
    }

    // τ = median energy E of block 0's keys on one batch (the 30M Tauformer run's calibration).
    fn calibrate_tau(&self, idx: &Tensor) -> f64 {
        tch::no_grad(|| {
            let (_, k, _) = self.qkv(0, &self.norm_in(&self.embed(idx)), 0);
            self.energies(&k, 1.0).0.median().double_value(&[])
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
                Some(rows) => m.head_chunked(&m.hidden(&x, None).to_kind(m.cdt).view([-1, m.cfg.n_embd]), &y.view([-1]), rows, false).0,
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
        lams.iter().map(|l| {
            let flat = l.flatten(0, -1);
            let n = flat.numel() as i64;
            let sample = if n > 1 << 24 { flat.narrow(0, 0, 1 << 24) } else { flat }; // quantile's input limit
            round4(sample.quantile_scalar(p, None, false, "linear").double_value(&[]))
        }).collect()
    };
    let inv: Vec<Vec<f64>> = (0..m.cfg.n_layer).map(|l| Vec::<f64>::try_from(m.layer_inv_temp(l).detach().to(Device::Cpu).to_kind(Kind::Double)).unwrap().into_iter().map(round4).collect()).collect();
    json!({"step": step, "lambda_p05": q(0.05), "lambda_p50": q(0.5), "lambda_p95": q(0.95), "inv_temp": inv})
}

// Model FLOPs utilisation of one GPU at `tokens_per_s`: llm.c's 6N + 6·L·C·T FLOPs a token over the bf16 peak.
fn mfu(m: &Model, tokens_per_s: f64) -> f64 {
    let c = &m.cfg;
    round4(tokens_per_s * (6.0 * m.n_params() as f64 + 6.0 * (c.n_layer * c.n_embd * c.seq_len) as f64) / H100_BF16_PEAK)
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

// ----------------------------------------------------------------------------------------------------------------
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
    muon: Vec<(Tensor, Tensor)>,         // (param, momentum buffer)
    groups: Vec<(Vec<i64>, Vec<usize>, i64)>, // Muon matrices by shape: (shape, their indices in `muon`, offset in the flat buffer)
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

    // The flat update buffer's length.
    fn muon_numel(&self) -> i64 {
        self.muon.iter().map(|(p, _)| p.numel() as i64).sum()
    }

    // This rank's Muon updates, scaled, in one flat fp32 buffer of every matrix, shape by shape (zeros where another
    // rank owns it). Same-shaped matrices go through Newton–Schulz together (one batched pass a shape: 4 shapes, not 24
    // matrices, in the speedrun model), and momentum takes one multi-tensor launch a shape: the step is launch-bound,
    // not FLOP-bound.
    fn muon_updates(&mut self, a: &TrainArgs, lr_mult: f64, cdt: Kind, rank: i64, world: i64) -> Tensor {
        let flat = Tensor::zeros([self.muon_numel()], (Kind::Float, self.muon.first().map_or(Device::Cpu, |(p, _)| p.device())));
        for (shape, idx, off) in &self.groups {
            // each rank owns a contiguous block of every shape's matrices
            let (first, count) = block(idx.len(), rank, world);
            if count == 0 {
                continue;
            }
            let own = &idx[first..first + count];
            let grads: Vec<Tensor> = own.iter().map(|&i| self.muon[i].0.grad()).collect();
            let (gs, bufs): (Vec<&Tensor>, Vec<&Tensor>) = (grads.iter().collect(), own.iter().map(|&i| &self.muon[i].1).collect());
            foreach_lerp_(&bufs, &gs, 1.0 - a.muon_momentum);
            let nesterov = foreach_lerp(&gs, &bufs, a.muon_momentum);
            let (rows, cols) = (shape[0] as f64, shape[1] as f64);
            let u = newton_schulz(&Tensor::stack(&nesterov, 0), a.ns_steps, cdt) * (-a.lr_muon * lr_mult * (rows / cols).max(1.0).sqrt());
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
                d.all_reduce(std::slice::from_ref(&flat), false)?; // a sum: every slice has one owner, the rest add zeros
            }
            for (shape, idx, off) in &self.groups {
                let k = idx.len() as i64;
                let upd = flat.narrow(0, *off, k * shape[0] * shape[1]).view([k, shape[0], shape[1]]);
                let upds: Vec<Tensor> = (0..k).map(|j| upd.get(j)).collect();
                foreach_add_(&idx.iter().map(|&i| &self.muon[i].0).collect::<Vec<_>>(), &upds.iter().collect::<Vec<_>>());
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
fn train_step(m: &mut Model, opt: &mut Optim, x: &Tensor, y: &Tensor, a: &TrainArgs, lr_mult: f64, dist: Option<&Dist>) -> Res<Tensor> {
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
        loss += m.loss_backward(&x.narrow(0, j * micro, micro), &y.narrow(0, j * micro, micro), head_chunk, 1.0 / accum as f64);
    }
    loss / accum as f64
}

// 50 warm-up steps, constant, then linear to 0 over the last cooldown_frac of the run (the reference's schedule).
fn lr_mult(a: &TrainArgs, i: i64) -> f64 {
    let cool = (a.steps as f64 * a.cooldown_frac) as i64;
    if i < a.steps - cool { ((i + 1) as f64 / a.warmup_steps.max(1) as f64).min(1.0) } else { ((a.steps - i) as f64 / cool as f64).max(0.0) }
}

// ----------------------------------------------------------------------------------------------------------------
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
        let file = fs::OpenOptions::new().write(true).create_new(true).open(path.with_extension("txt.partial"))
            .map_err(|e| format!("{}: {e}; pass a writable --log-dir", dir.display()))?;
        Ok(Log { path, file: Some(file), silent: false })
    }
    fn silent() -> Log {
        Log { path: PathBuf::new(), file: None, silent: true }
    }
    // Everything logged is printed too.
    fn line(&mut self, s: &str) {
        if !self.silent {
            println!("{s}");
        }
        self.quiet(s);
    }
    fn quiet(&mut self, s: &str) {
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{s}").expect("log write");
        }
    }
    fn finish(mut self) -> PathBuf {
        self.file.take().unwrap().sync_all().expect("log sync");
        fs::rename(self.path.with_extension("txt.partial"), &self.path).expect("log rename");
        self.path.clone()
    }
}

// A run that fails leaves no half-written log behind.
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
    let py = Path::new(&lib).parent().and_then(Path::parent).and_then(|d| fs::read_to_string(d.join("version.py")).ok()).unwrap_or_default();
    let field = |k: &str| py.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim_matches(|c| " ='\"".contains(c)).to_string()).unwrap_or("unknown".into());
    (field("__version__"), field("cuda: Optional[str]"))
}

fn gpu_name(dev: Device) -> Option<String> {
    match dev {
        Device::Cuda(i) => sh("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader", &format!("--id={i}")]),
        _ => None,
    }
}

fn write_header(log: &mut Log, dev: Device) {
    log.quiet(SOURCE.trim_end());
    for (name, text) in KERNEL_FILES {
        log.quiet(&"-".repeat(40));
        log.quiet(&format!("# {name}"));
        log.quiet(text.trim_end());
    }
    log.quiet(&"=".repeat(100));
    let (torch, cuda) = libtorch_version();
    log.line(&format!("rustc: {}", env!("TRAIN_GPT_RUSTC")));
    log.line(&format!("tch: {}", env!("TRAIN_GPT_TCH")));
    log.line(&format!("libtorch: {torch}"));
    log.line(&format!("cuda: {}", if dev.is_cuda() { cuda } else { "none".into() }));
    log.line(&format!("gpu: {}", gpu_name(dev).unwrap_or("none".into())));
    log.line(&format!("host_threads: {}", rayon::current_num_threads()));
    log.quiet("nvidia-smi:");
    log.quiet(&if dev.is_cuda() { sh("nvidia-smi", &[]).unwrap_or("none".into()) } else { "none".into() });
    log.quiet(&"=".repeat(100));
}

mod ext {
    use std::os::raw::{c_char, c_void};
    extern "C" {
        pub fn tg_memory_peaks(device: i32, peak_allocated: *mut i64, peak_reserved: *mut i64);
        pub fn tg_reset_memory_peaks(device: i32);
        pub fn tg_set_device(device: i32);
        pub fn tg_memory_allocated(device: i32) -> i64;
        // at::Tensor* in and out: tch's handles
        pub fn tg_tau_attention(lq: *mut c_void, lk: *mut c_void, v: *mut c_void, it: *mut c_void, chunk: i64, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_tau_flash(lq: *mut c_void, lk: *mut c_void, v: *mut c_void, it: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_softcap_ce(z: *mut c_void, y: *mut c_void, softcap: f64, scale: f64, grad: i32, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_rmsnorm(x: *mut c_void, out_dtype: i32, eps: f64, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_add_rmsnorm(x: *mut c_void, y: *mut c_void, out_dtype: i32, eps: f64, out: *mut *mut c_void, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_rope_norm(qkv: *mut c_void, cos: *mut c_void, sin: *mut c_void, h: i64, g: i64, pos: i64, eps: f64, out: *mut *mut c_void, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_relu2(u: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_taumode(x: *mut c_void, lap: *mut c_void, tau: f64, eps: f64, out: *mut *mut c_void, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_readback_start(t: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_readback_wait(h: *mut c_void) -> f64;
        pub fn tg_foreach_lerp(a: *const *mut c_void, b: *const *mut c_void, n: i32, w: f64, out: *mut *mut c_void, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_foreach_add_(a: *const *mut c_void, b: *const *mut c_void, n: i32, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_foreach_zero_(a: *const *mut c_void, n: i32, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_profile_start(cuda: i32, err: *mut c_char, errlen: usize) -> i32;
        pub fn tg_profile_stop(path: *const c_char, err: *mut c_char, errlen: usize) -> i32;
    }
}

// A scalar tensor's value on its way to the host. On CUDA a non-blocking copy and an event: `wait` blocks until the
// copy is done, not until the work queued after it is, so the host can queue the next step first. On the CPU, the value.
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

// Runs f under the Kineto profiler (CPU ops; on CUDA also kernels) and writes its Chrome trace to `path`, whole or not at all.
fn profiled<T>(path: &Path, dev: Device, f: impl FnOnce() -> Res<T>) -> Res<T> {
    let fail = |(rc, err): (i32, String)| if rc == 0 { Ok(()) } else { Err(format!("profiler: {err}")) };
    fail(ffi(|e, n| unsafe { ext::tg_profile_start(dev.is_cuda() as i32, e, n) }))?;
    let out = f();
    let tmp = std::ffi::CString::new(path.with_extension("partial").to_string_lossy().as_bytes()).unwrap();
    fail(ffi(|e, n| unsafe { ext::tg_profile_stop(tmp.as_ptr(), e, n) }))?;
    fs::rename(path.with_extension("partial"), path).map_err(|e| format!("{}: cannot write ({e}); check the folder is writable", path.display()))?;
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

// ----------------------------------------------------------------------------------------------------------------
// Several GPUs: one process per GPU, libtorch's c10d (TCPStore rendezvous, ProcessGroupNCCL), torchrun's variables

mod dist_ffi {
    use std::os::raw::{c_char, c_int, c_longlong, c_void};
    extern "C" {
        pub fn tg_dist_init(host: *const c_char, port: c_int, rank: c_int, world: c_int, timeout_ms: c_int, nccl: c_int, err: *mut c_char, errlen: usize) -> *mut c_void;
        pub fn tg_all_reduce(dist: *mut c_void, tensors: *const *mut c_void, n: c_int, op: c_int, err: *mut c_char, errlen: usize) -> c_int; // at::Tensor*[]
        pub fn tg_dist_sync(dist: *mut c_void, keep: c_int, err: *mut c_char, errlen: usize) -> c_int;
        pub fn tg_dist_pending(dist: *mut c_void) -> c_int;
        pub fn tg_store_add(dist: *mut c_void, key: *const c_char, delta: c_longlong, wait_for: c_longlong, err: *mut c_char, errlen: usize) -> c_longlong;
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
            Some(v) => v.trim().parse().map_err(|_| format!("{k}={v:?} is not a number; set it to an integer or unset it")),
            None => default.ok_or(format!("{k} is unset but WORLD_SIZE is set; set RANK, WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) together")),
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
    let env = DistEnv { rank, world, local_rank: num("LOCAL_RANK", Some(rank))?, addr: get("MASTER_ADDR").unwrap_or("127.0.0.1".into()), port: num("MASTER_PORT", Some(29500))? };
    Ok((world > 1).then_some(env))
}

struct Dist {
    ptr: *mut std::os::raw::c_void,
    rank: i64,
    world: i64,
    failed: std::cell::Cell<bool>, // after an error nobody waits for anybody on the way out
}

// Calls into kernels/ext.cpp with an error buffer: (the result, the error message it wrote, "" if none).
fn ffi<T>(call: impl FnOnce(*mut std::os::raw::c_char, usize) -> T) -> (T, String) {
    let mut buf = vec![0u8; 512];
    let r = call(buf.as_mut_ptr() as *mut _, buf.len());
    (r, String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]).to_string())
}

impl Dist {
    // Meets the other ranks at MASTER_ADDR:MASTER_PORT (rank 0 serves the store); with NCCL on CUDA also forms the group.
    fn init(e: &DistEnv, timeout_s: f64, nccl: bool) -> Res<Dist> {
        let host = std::ffi::CString::new(e.addr.clone()).map_err(|_| "MASTER_ADDR holds a NUL byte".to_string())?;
        let (ptr, err) = ffi(|b, n| unsafe { dist_ffi::tg_dist_init(host.as_ptr(), e.port as i32, e.rank as i32, e.world as i32, (timeout_s * 1e3) as i32, nccl as i32, b, n) });
        if ptr.is_null() {
            return Err(format!("rank {}: rendezvous at {}:{} failed ({err}); check MASTER_ADDR/MASTER_PORT and that all {} ranks start", e.rank, e.addr, e.port, e.world));
        }
        Ok(Dist { ptr, rank: e.rank, world: e.world, failed: false.into() })
    }
    // In place over the ranks: average (avg) or sum, stream-ordered (the GPU waits, the CPU runs on). Read a result on
    // the host only after `sync`.
    fn all_reduce(&self, ts: &[Tensor], avg: bool) -> Res<()> {
        let ptrs: Vec<*mut std::os::raw::c_void> = ts.iter().map(|t| t.as_ptr() as *mut _).collect(); // tch's handle is the at::Tensor*
        self.collective(ffi(|b, n| unsafe { dist_ffi::tg_all_reduce(self.ptr, ptrs.as_ptr(), ptrs.len() as i32, avg as i32, b, n) }))
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
            return Err(format!("rank {}: all-reduce failed ({err}); another rank died or hung, see its error", self.rank));
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
// 0's output through, and stop them all as soon as one fails, naming it. Returns the exit code.
fn launch(nproc: i64) -> Res<i32> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| format!("no free local port for the rendezvous: {e}"))?.port();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut kids = vec![];
    for r in 0..nproc {
        let mut c = std::process::Command::new(&exe);
        c.args(std::env::args().skip(1)).env("RANK", r.to_string()).env("LOCAL_RANK", r.to_string()).env("WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
        if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
            // libtorch's store client logs a warning and a stack trace when a dead peer's socket resets; the rank's own
            // error already says it in one line
            c.env("TORCH_CPP_LOG_LEVEL", "ERROR");
        }
        if r > 0 {
            c.stdout(std::process::Stdio::null()); // rank 0 speaks for the run; errors still reach stderr
        }
        kids.push(c.spawn().map_err(|e| format!("cannot start rank {r}: {e}"))?);
    }
    let mut done = vec![false; kids.len()];
    loop {
        for (r, k) in kids.iter_mut().enumerate() {
            if done[r] {
                continue;
            }
            if let Some(st) = k.try_wait().map_err(|e| format!("rank {r}: {e}"))? {
                done[r] = true;
                if !st.success() {
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
            return Ok(0);
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

// ----------------------------------------------------------------------------------------------------------------
// Training

fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

// --laplacian chain|corpus|file:PATH → (L, stats json). The corpus build reads the head of the train split.
fn build_laplacian(a: &TrainArgs, f: i64, data: &Data, dev: Device) -> Res<(Tensor, Value)> {
    let t0 = Instant::now();
    let l = match a.laplacian.as_str() {
        "chain" => chain_laplacian(f),
        "corpus" => {
            let cfg = LapConfig { window: a.lap_window, n_tokens: a.lap_tokens, k_items: a.lap_k, dim: f as usize, eps: a.lap_eps,
                                  topk: a.lap_topk, p: a.lap_p, sigma: a.lap_sigma, seed: a.seed as u64 };
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

fn compute_kind(spec: &str, dev: Device) -> Res<Kind> {
    match spec {
        "auto" => Ok(if dev.is_cuda() { Kind::BFloat16 } else { Kind::Float }),
        "bf16" => Ok(Kind::BFloat16),
        "f32" => Ok(Kind::Float),
        s => Err(format!("--dtype {s}: unknown; use auto, bf16 or f32")),
    }
}

// --kernels fused: one way of running tau attention at a time, on CUDA, at a head dim the kernels are built for.
fn check_kernels(kernels: Kernels, tau_chunk: i64, dev: Device, d: i64) -> Res<()> {
    if kernels == Kernels::Plain {
        return Ok(());
    }
    if tau_chunk > 0 {
        return Err("--kernels fused and --tau-chunk are two ways to run tau attention; pass one of them".into());
    }
    if !dev.is_cuda() {
        return Err(format!("--kernels fused needs CUDA (the device is {dev:?}); pass --kernels plain"));
    }
    if !FUSED_HEAD_DIMS.contains(&d) {
        return Err(format!("--kernels fused: head dim {d} (--n-embd / --n-head) is not one of {FUSED_HEAD_DIMS:?}; pass --kernels plain"));
    }
    Ok(())
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
    Some(format!("running on {world} ranks needs a CUDA GPU each (NCCL, cuda:LOCAL_RANK a rank), but {why}; on CPU use --nproc 1, on a GPU box --device auto"))
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

fn cmd_train(mut a: TrainArgs, m: &ArgMatches) -> Res<()> {
    let de = dist_env(|k| std::env::var(k).ok())?;
    let (rank, world_size) = de.as_ref().map_or((0, 1), |e| (e.rank, e.world));
    let dev = rank_device(&de, &a.device)?;
    apply_preset(&mut a, m, dev.is_cuda());
    let cdt = compute_kind(&a.dtype, dev)?;
    for (ok, what) in [(a.steps > 0, "--steps must be > 0"), (a.batch_size > 0 && a.seq_len > 1, "--batch-size and --seq-len must be positive"),
                       (a.val_every > 0, "--val-every must be > 0"), ((0.0..=1.0).contains(&a.cooldown_frac), "--cooldown-frac must be in [0,1]"),
                       (a.tau_temp > 0.0 && a.inv_temp_init > 0.0, "--tau-temp and --inv-temp-init must be > 0"),
                       (a.n_layer >= 1 && a.n_head >= 1, "--n-layer and --n-head must be ≥ 1"),
                       (a.n_head < 1 || a.n_embd % a.n_head == 0, "--n-embd must be a multiple of --n-head"), // the line above refuses --n-head 0
                       (a.n_kv_head >= 0 && (a.n_kv_head == 0 || a.n_head % a.n_kv_head == 0), "--n-head must be a multiple of --n-kv-head"),
                       (a.batch_size % world_size == 0, "--batch-size must split evenly over the ranks"),
                       (a.micro_batch >= 0 && (a.micro_batch == 0 || (a.batch_size / world_size) % a.micro_batch == 0), "--micro-batch must divide batch_size / ranks")] {
        if !ok {
            return Err(format!("{what}; see train_gpt train --help"));
        }
    }
    check_kernels(a.kernels, a.tau_chunk, dev, a.n_embd / a.n_head)?;
    let data = load_data(&a.data, a.vocab_size)?;
    if data.train.len() as i64 <= a.batch_size * a.seq_len + 1 || data.val.len() as i64 <= a.seq_len + 1 {
        return Err(format!("{}: {} train / {} val tokens is too few for batch {}×{}; lower --batch-size/--seq-len", a.data.display(), data.train.len(), data.val.len(), a.batch_size, a.seq_len));
    }
    tch::manual_seed(a.seed);
    let cfg = ModelCfg::from_args(&a, a.attn);
    let variant = cfg.attn.clone();
    let dist = match &de {
        Some(e) => Some(Dist::init(e, a.dist_timeout, true)?),
        None => None,
    };
    let gpu = gpu_name(dev);
    let corpus = a.data.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or("data".into());
    let track = format!("{corpus}_{world_size}x{}", gpu.as_deref().map(|g| g.trim_start_matches("NVIDIA ").replace(' ', "-")).unwrap_or("CPU".into()));

    let mut log = if rank == 0 { Log::create(&a.log_dir)? } else { Log::silent() }; // rank 0 alone writes the log
    write_header(&mut log, dev);
    let mut config = serde_json::to_value(&a).unwrap();
    config["variant"] = json!(variant);
    config["track"] = json!(track);
    config["device"] = json!(format!("{dev:?}"));
    config["compute_dtype"] = json!(format!("{cdt:?}"));
    config["world_size"] = json!(world_size);
    log.line(&format!("config: {config}"));
    log.line(&format!("data: {}", data.info));

    // The timed region starts here: a tau run pays for its Laplacian and its τ calibration, but nobody for the CUDA
    // context, which the first device operation would otherwise create inside the clock.
    if dev.is_cuda() {
        let _ = Tensor::zeros([1], (Kind::Float, dev));
        sync(dev);
        reset_memory_peaks(dev);
    }
    let train_tokens = device_tokens(&data.train, dev);
    let mut train_ms = 0.0;
    let t0 = Instant::now();
    let (lap, lap_ms) = if cfg.is_tau() {
        let (l, stats) = build_laplacian(&a, cfg.head_dim(), &data, dev)?;
        log.line(&format!("laplacian: {stats}"));
        let ms = stats["build_ms"].as_f64();
        if rank == 0 {
            save_laplacian(&log.path.with_extension("laplacian.npy"), &l)?;
        }
        (Some(l), ms)
    } else {
        (None, None)
    };
    let mut model = Model::from_args(cfg.clone(), &a, dev, cdt, lap);
    if cfg.is_tau() {
        model.tau = match a.tau {
            Some(t) => t,
            None => model.calibrate_tau(&train_batch(&train_tokens, 0, a.batch_size, a.seq_len, 0, 1).0), // the whole batch on every rank
        };
        log.line(&format!("tau: {}", model.tau));
    }
    let mut opt = Optim::new(&model);
    sync(dev);
    train_ms += t0.elapsed().as_secs_f64() * 1e3;
    let n_params = model.n_params();
    log.line(&format!("params: {n_params}"));

    let tokens_per_step = a.batch_size * a.seq_len;
    let mut time_to_target: Option<f64> = None;
    let mut final_val = f64::NAN;
    // Steps are queued one ahead, as in modded-nanogpt: step s's loss is read (checked, logged) once step s+1 is queued,
    // so the GPU never waits for the host between steps. Validation syncs, and pauses the clock: train_time is exact
    // there; a step line's is when the line is written, once the next step is queued.
    let mut clock = Instant::now();
    let mut lagged: Option<(i64, Readback)> = None;
    let step_line = |log: &mut Log, s: i64, rb: Readback, ms: f64| -> Res<()> {
        let lv = rb.wait();
        if !lv.is_finite() {
            return Err(format!("step {}: train loss is {lv}; the run diverged, lower --lr-muon/--lr-adam or check the data", s + 1));
        }
        log.line(&format!("step:{}/{} train_loss:{lv:.4} train_time:{ms:.0}ms step_avg:{:.2}ms", s + 1, a.steps, ms / (s + 1) as f64));
        Ok(())
    };
    for step in 0..=a.steps {
        let last = step == a.steps;
        if last || step % a.val_every == 0 {
            if let Some((s, rb)) = lagged.take() {
                step_line(&mut log, s, rb, train_ms + clock.elapsed().as_secs_f64() * 1e3)?;
            }
            sync(dev);
            train_ms += clock.elapsed().as_secs_f64() * 1e3; // the clock is paused during validation
            let vl = evaluate(&model, &data.val, a.batch_size, a.val_tokens, a.head_chunk, dist.as_ref())?;
            if !vl.is_finite() {
                return Err(format!("step {step}: val loss is {vl}; the run diverged, lower --lr-muon/--lr-adam"));
            }
            final_val = vl;
            if time_to_target.is_none() && vl <= a.target_val_loss {
                time_to_target = Some(train_ms);
            }
            log.line(&format!("step:{step}/{} val_loss:{vl:.4} train_time:{:.0}ms step_avg:{:.2}ms", a.steps, train_ms, train_ms / step.max(1) as f64));
            if cfg.is_tau() && rank == 0 {
                log.line(&format!("diag: {}", tau_diagnostics(&model, &data.val, a.batch_size, step)));
            }
            clock = Instant::now();
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
        log.line(&format!("peak memory allocated: {al:.0} MiB reserved: {re:.0} MiB"));
    }
    let steps_ms = train_ms - lap_ms.unwrap_or(0.0);
    let tokens_per_s = (a.steps * tokens_per_step) as f64 / (steps_ms / 1e3);
    // Each rank's own rate, gathered by a sum over one slot a rank.
    let per_rank = Tensor::zeros([world_size], (Kind::Float, dev));
    let _ = per_rank.get(rank).fill_(tokens_per_s * rank_rows(a.batch_size, rank, world_size).1 as f64 / a.batch_size as f64);
    if let Some(d) = &dist {
        d.all_reduce(std::slice::from_ref(&per_rank), false)?;
        d.sync()?;
    }
    if rank > 0 {
        return Ok(()); // rank 0 writes the log, the sample and the checkpoint
    }
    if a.sample_tokens > 0 {
        let text = decode_ids(&generate(&model, &tokenizer().encode_ordinary("\n").into_iter().map(|x| x as i64).collect::<Vec<_>>(), a.sample_tokens, 0.8, 50, a.seed, true)?)?;
        log.line(&format!("sample: {}", json!(text)));
    }
    if let Some(path) = &a.save_checkpoint {
        save_checkpoint(&model, path)?;
        log.line(&format!("checkpoint: {}", path.display()));
    }
    let mfu = gpu.is_some().then(|| mfu(&model, tokens_per_s / world_size as f64));
    let per_rank: Vec<f64> = Vec::<f64>::try_from(per_rank.to(Device::Cpu).to_kind(Kind::Double)).unwrap().into_iter().map(f64::round).collect();
    let summary = json!({"variant": variant, "track": track, "laplacian": cfg.is_tau().then(|| a.laplacian.clone()), "steps": a.steps,
        "final_val_loss": round4(final_val), "target_val_loss": a.target_val_loss, "time_to_target_ms": time_to_target.map(|t| t.round()),
        "train_time_ms": train_ms.round(), "ms_per_step": round4(steps_ms / a.steps as f64), "tokens_per_s": tokens_per_s.round(), "mfu": mfu,
        "peak_alloc_mib": peaks.map(|p| p.0.round()), "peak_reserved_mib": peaks.map(|p| p.1.round()), "world_size": world_size,
        "tokens_per_s_per_rank": per_rank, "micro_batch": a.micro_batch,
        "laplacian_build_ms": lap_ms, "tau": cfg.is_tau().then_some(model.tau), "params": n_params});
    log.line(&format!("summary: {summary}"));
    let path = log.finish();
    println!("log: {}", path.display());
    Ok(())
}

// Steady ms/step of the training step on random tokens (no data, no validation), per variant. Under --nproc N each
// rank times its share of the global batch, as in training, and rank 0 reports.
fn cmd_bench(b: BenchArgs, m: &ArgMatches) -> Res<()> {
    let de = dist_env(|k| std::env::var(k).ok())?;
    let (rank, world) = de.as_ref().map_or((0, 1), |e| (e.rank, e.world));
    let dev = rank_device(&de, &b.train.device)?;
    let mut a = b.train.clone();
    apply_preset(&mut a, m, dev.is_cuda());
    check_kernels(a.kernels, a.tau_chunk, dev, a.n_embd / a.n_head)?;
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
        let cfg = ModelCfg::from_args(&a, *attn);
        let variant = cfg.attn.clone();
        let lap = cfg.is_tau().then(|| chain_laplacian(cfg.head_dim()));
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
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}; pass a writable --profile folder", dir.display()))?;
            profiled(&dir.join(format!("{variant}_rank{rank}.json")), dev, || {
                for _ in 0..PROFILE_STEPS {
                    let _ = train_step(&mut model, &mut opt, &x, &y, &a, 1.0, d)?;
                    done()?;
                }
                Ok(())
            })?;
        }
        let row = json!({"impl": "rust", "attn": variant, "optimizer": "muon+adam", "batch": a.batch_size, "seq": a.seq_len,
            "world_size": world, "rows_per_rank": rows_here,
            "ms_per_step": round4(ms), "tokens_per_s": tok_s.round(), "mfu": gpu.is_some().then(|| mfu(&model, tok_s / world as f64)),
            "forward_backward_ms": round4(phase_ms[0]), "all_reduce_ms": round4(phase_ms[1]), "optimizer_ms": round4(phase_ms[2]),
            "peak_mem_mib": memory_peaks(dev).map(|p| p.0.round()), "device": format!("{dev:?}"), "gpu": gpu, "compute_dtype": format!("{cdt:?}"),
            "kernels": a.kernels, "tau_chunk": a.tau_chunk, "head_chunk": a.head_chunk});
        if rank == 0 {
            println!("{row}");
        }
        rows.push(row);
    }
    if let (Some(out), 0) = (&b.out, rank) {
        write_atomic(out, serde_json::to_string_pretty(&rows).unwrap().as_bytes())?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------------------------
// Records tooling: parse logs (any harness version), statistics against the target, log diffs, SVG plots

mod records {
// Run records: parse the logs train_gpt.rs writes to logs/<uuid>.txt, test a set of runs against the
// target val loss, diff two runs, and plot val-loss curves to SVG.
use plotters::prelude::*;
use serde_json::{Map, Value, json};
use similar::{ChangeTag, TextDiff};
use statrs::distribution::{ContinuousCDF, StudentsT};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct RunLog {
    pub path: String,
    pub source: String,
    pub config: Map<String, Value>,
    pub data: Option<Value>,
    pub summary: Option<Value>,
    pub val: Vec<(u64 /*step*/, f64 /*train_time_ms*/, f64 /*val_loss*/)>,
    pub step_avg_ms: Option<f64>, // last step line
    pub peak_alloc_mib: Option<f64>,
    pub versions: Vec<(String, String)>,
}

/// A separator line: exactly `n` copies of `c` (trailing blanks tolerated).
fn is_rule(l: &str, c: u8, n: usize) -> bool {
    let l = l.trim_end();
    l.len() == n && l.bytes().all(|b| b == c)
}

pub fn parse_log(path: &Path) -> Result<RunLog, String> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{p}: {e}; pass a train_gpt log (logs/ or records/)"))?.replace("\r\n", "\n");
    let lines: Vec<&str> = text.lines().collect();
    let eq = lines
        .iter()
        .position(|l| is_rule(l, b'=', 100))
        .ok_or_else(|| format!("{p}: not a train_gpt log (no '=' separator line); pass a file from logs/"))?;
    let mut log = RunLog {
        path: p,
        source: lines[..eq].join("\n"),
        config: Map::new(),
        data: None,
        summary: None,
        val: vec![],
        step_avg_ms: None,
        peak_alloc_mib: None,
        versions: vec![],
    };
    // The version block ends at the second '=' rule; older or truncated logs may lack it, so it also ends
    // at the first record line.
    let rest = &lines[eq + 1..];
    let hdr = rest
        .iter()
        .position(|l| is_rule(l, b'=', 100) || l.starts_with("config:") || l.starts_with("step:"))
        .unwrap_or(rest.len());
    let mut smi = false;
    for l in &rest[..hdr] {
        if let Some(v) = l.split("Driver Version:").nth(1) {
            log.versions.push(("driver".into(), v.split_whitespace().next().unwrap_or("").into()));
        } else if smi {
            // the rest of the raw nvidia-smi table is not a version
        } else if let Some((k, v)) = l.split_once(':').filter(|(k, _)| !k.is_empty() && !k.contains(' ')) {
            smi = k == "nvidia-smi";
            if !smi {
                log.versions.push((k.into(), v.trim().into()));
            }
        }
    }
    for l in &rest[hdr..] {
        // A record whose JSON doesn't parse (e.g. cut off by a crash) counts as missing.
        let rec = |k: &str| l.strip_prefix(k).and_then(|s| serde_json::from_str::<Value>(s).ok());
        if let Some(Value::Object(m)) = rec("config:") {
            log.config = m;
        } else if let Some(v) = rec("data:") {
            log.data = Some(v);
        } else if let Some(v) = rec("summary:") {
            log.summary = Some(v);
        } else if let Some(s) = l.strip_prefix("peak memory allocated:") {
            log.peak_alloc_mib = s.split_whitespace().next().and_then(|x| x.parse().ok());
        } else if l.starts_with("step:") {
            let kv: BTreeMap<&str, &str> = l.split_whitespace().filter_map(|t| t.split_once(':')).collect();
            let num = |k: &str| kv.get(k).and_then(|v| v.trim_end_matches("ms").parse::<f64>().ok());
            let Some(step) = kv["step"].split('/').next().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(v) = num("val_loss") {
                log.val.push((step, num("train_time").unwrap_or(f64::NAN), v));
            }
            log.step_avg_ms = num("step_avg").or(log.step_avg_ms);
        }
    }
    log.peak_alloc_mib = log.peak_alloc_mib.or_else(|| log.sum("peak_alloc_mib"));
    Ok(log)
}

impl RunLog {
    fn sum(&self, k: &str) -> Option<f64> {
        self.summary.as_ref()?.get(k)?.as_f64()
    }
    pub fn variant(&self) -> String {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        s(self.summary.as_ref().and_then(|m| m.get("variant")))
            .or_else(|| s(self.config.get("variant")))
            .or_else(|| s(self.config.get("attn")))
            .unwrap_or_else(|| "unknown".into())
    }
    pub fn final_val_loss(&self) -> Option<f64> {
        self.sum("final_val_loss").or(self.val.last().map(|v| v.2))
    }
    pub fn target(&self) -> Option<f64> {
        self.sum("target_val_loss").or_else(|| self.config.get("target_val_loss")?.as_f64())
    }
    pub fn time_to_target_ms(&self) -> Option<f64> {
        // A summary's null means "not reached"; only logs without the key are re-derived from val lines.
        match self.summary.as_ref().and_then(|s| s.get("time_to_target_ms")) {
            Some(v) => v.as_f64(),
            None => self.val.iter().find(|v| v.2 <= self.target().unwrap_or(f64::NAN)).map(|v| v.1),
        }
    }
    pub fn train_time_ms(&self) -> Option<f64> {
        self.sum("train_time_ms").or(self.val.last().map(|v| v.1).filter(|t| t.is_finite()))
    }
    fn ms_per_step(&self) -> Option<f64> {
        self.sum("ms_per_step").or(self.step_avg_ms)
    }
    fn tokens_per_s(&self) -> Option<f64> {
        self.sum("tokens_per_s")
    }
    /// The variant, and for tau runs the Laplacian source: `tau/chain`.
    fn label(&self) -> String {
        match self.summary.as_ref().and_then(|s| s.get("laplacian")).and_then(Value::as_str) {
            Some(lap) => format!("{}/{lap}", self.variant()),
            None => self.variant(),
        }
    }
    /// Log file stem, cut to a uuid's first group, to tell runs of one variant apart.
    fn short_id(&self) -> String {
        Path::new(&self.path).file_stem().map_or(String::new(), |s| s.to_string_lossy().chars().take(8).collect())
    }
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub loss_mean: f64,
    pub loss_std: f64,
    pub time_mean: f64,
    pub time_std: f64,
    pub time_kind: &'static str,
    pub target: f64,
    pub t: f64,
    pub p_value: f64,
}

type Metric = fn(&RunLog) -> Option<f64>;

fn mean_std(x: &[f64]) -> (f64, f64) {
    let m = x.iter().sum::<f64>() / x.len() as f64;
    (m, (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt())
}

/// One-sided one-sample t-test of final val loss, H0: mean >= target vs H1: mean < target.
pub fn stats(logs: &[RunLog]) -> Result<Stats, String> {
    if logs.len() < 2 {
        return Err(format!("stats: need at least 2 logs, got {}", logs.len()));
    }
    let one = |what: &str, set: BTreeSet<String>| match set.len() {
        1 => Ok(()),
        _ => Err(format!(
            "stats: mixed {what}s ({}); pass logs of one {what}",
            set.into_iter().collect::<Vec<_>>().join(", ")
        )),
    };
    one("variant", logs.iter().map(RunLog::variant).collect())?;
    let each = |what: &str, f: &dyn Fn(&RunLog) -> Option<f64>| -> Result<Vec<f64>, String> {
        logs.iter().map(|l| f(l).ok_or_else(|| format!("{}: no {what}", l.path))).collect()
    };
    let targets = each("target_val_loss", &RunLog::target)?;
    one("target", targets.iter().map(f64::to_string).collect())?;
    let loss = each("final val loss", &RunLog::final_val_loss)?;
    let reached = logs.iter().all(|l| l.time_to_target_ms().is_some());
    let (time_kind, f): (&str, Metric) = match reached {
        true => ("time_to_target_ms", RunLog::time_to_target_ms),
        false => ("train_time_ms", RunLog::train_time_ms),
    };
    let time = each(time_kind, &f)?;
    let ((loss_mean, loss_std), (time_mean, time_std), n) = (mean_std(&loss), mean_std(&time), logs.len());
    let t = (loss_mean - targets[0]) / (loss_std / (n as f64).sqrt());
    // identical losses equal to the target give t = 0/0; statrs would be fed a NaN
    let p_value =
        if t.is_nan() { f64::NAN } else { StudentsT::new(0.0, 1.0, (n - 1) as f64).map_err(|e| e.to_string())?.cdf(t) };
    Ok(Stats { n, loss_mean, loss_std, time_mean, time_std, time_kind, target: targets[0], t, p_value })
}

/// Welch's unequal-variance t-test, two-sided: (t, Welch–Satterthwaite df, p).
pub fn welch(a: &[f64], b: &[f64]) -> Result<(f64, f64, f64), String> {
    if a.len() < 2 || b.len() < 2 {
        return Err(format!("compare: need at least 2 runs a side, got {} and {}", a.len(), b.len()));
    }
    let ((ma, sa), (mb, sb)) = (mean_std(a), mean_std(b));
    let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
    if va + vb == 0.0 {
        // no spread on either side (e.g. times rounded to the same ms): equal means do not differ, unequal ones surely do
        let df = (a.len() + b.len() - 2) as f64;
        return Ok(if ma == mb { (0.0, df, 1.0) } else { ((ma - mb).signum() * f64::INFINITY, df, 0.0) });
    }
    let t = (ma - mb) / (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let p = 2.0 * StudentsT::new(0.0, 1.0, df).map_err(|e| e.to_string())?.cdf(-t.abs());
    Ok((t, df, p))
}

/// Two sets of runs side by side: final val loss and training time (time-to-target when every run of both reached
/// it), each with Welch's two-sided test of the difference.
pub fn compare_report(a: &[RunLog], b: &[RunLog]) -> Result<String, String> {
    let col = |logs: &[RunLog], f: Metric, what: &str| -> Result<Vec<f64>, String> {
        logs.iter().map(|l| f(l).ok_or_else(|| format!("{}: no {what}", l.path))).collect()
    };
    let reached = a.iter().chain(b).all(|l| l.time_to_target_ms().is_some());
    let (tk, tf): (&str, Metric) = if reached { ("time_to_target_ms", RunLog::time_to_target_ms) } else { ("train_time_ms", RunLog::train_time_ms) };
    let mut out = format!("compare: {} ({} runs) vs {} ({} runs)\n", a[0].label(), a.len(), b[0].label(), b.len());
    let mut j = Map::new();
    for (name, f) in [("final_val_loss", RunLog::final_val_loss as Metric), (tk, tf)] {
        let (x, y) = (col(a, f, name)?, col(b, f, name)?);
        let (t, df, p) = welch(&x, &y)?;
        let (mx, my) = (mean_std(&x).0, mean_std(&y).0);
        out += &format!("{name}: {mx:.4} vs {my:.4} diff {:.4} welch_t {t:.3} df {df:.2} p_two_sided {p:.3e}\n", mx - my);
        j.insert(name.to_string(), json!({"a": mx, "b": my, "t": t, "df": df, "p": p}));
    }
    out += &format!("compare_json: {}", Value::Object(j));
    Ok(out)
}

pub fn stats_report(s: &Stats) -> String {
    let k = s.time_kind;
    let j = json!({"n": s.n, "loss_mean": s.loss_mean, "loss_std": s.loss_std, "time_kind": k, "time_mean": s.time_mean,
        "time_std": s.time_std, "target": s.target, "t": s.t, "p_value": s.p_value});
    format!(
        "runs: {}\ntarget_val_loss: {}\nval_loss_mean: {:.6}\nval_loss_std: {:.6}\n{k}_mean: {:.1}\n{k}_std: {:.1}\n\
         t: {:.4}\np_value: {}\nstats: {j}\n",
        s.n,
        s.target,
        s.loss_mean,
        s.loss_std,
        s.time_mean,
        s.time_std,
        s.t,
        if s.p_value >= 1e-3 { format!("{:.4}", s.p_value) } else { format!("{:.3e}", s.p_value) }
    )
}

/// For each line of an embedded source, the innermost Rust `fn` around it (syn parses the source; a source that
/// does not parse owns nothing); lines after the 40-dash rule belong to the kernel file named by the `# kernels/..`
/// header above them.
fn fn_owners(src: &str) -> Vec<Option<String>> {
    let lines: Vec<&str> = src.lines().collect();
    let rust = lines.iter().position(|l| is_rule(l, b'-', 40)).unwrap_or(lines.len());
    let mut out = vec![None; lines.len()];
    struct Fns(Vec<(String, usize, usize)>); // (name, first line, last line), 1-based
    impl<'a> syn::visit::Visit<'a> for Fns {
        fn visit_item_fn(&mut self, f: &'a syn::ItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_item_fn(self, f);
        }
        fn visit_impl_item_fn(&mut self, f: &'a syn::ImplItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_impl_item_fn(self, f);
        }
        fn visit_trait_item_fn(&mut self, f: &'a syn::TraitItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_trait_item_fn(self, f);
        }
    }
    trait SpanLines {
        fn span_lines(&self) -> (usize, usize);
    }
    impl<T: syn::spanned::Spanned> SpanLines for T {
        fn span_lines(&self) -> (usize, usize) {
            let s = self.span();
            (s.start().line, s.end().line)
        }
    }
    if let Ok(file) = syn::parse_file(&lines[..rust].join("\n")) {
        let mut fns = Fns(vec![]);
        syn::visit::Visit::visit_file(&mut fns, &file);
        // outer functions come first in visiting order, so later (inner) ones overwrite them
        for (name, first, last) in fns.0 {
            (first..=last).for_each(|l| out[l - 1] = Some(name.clone()));
        }
    }
    let mut kernel = None::<String>;
    for (i, l) in lines.iter().enumerate().skip(rust) {
        kernel = l.strip_prefix("# ").map(|k| k.trim().to_string()).or(kernel);
        out[i] = kernel.clone();
    }
    out
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// The README records table: one row per record folder `<root>/<track>/<YYYY-MM-DD>_<Name>/` of run logs,
/// every figure recomputed from the logs (a test holds the README to it).
pub fn records_table(root: &Path) -> Result<String, String> {
    let dirs = |p: &Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(p).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        v.sort();
        v
    };
    let mut out = String::from("| track | record | variant | laplacian | runs | final val loss | p (< target) | time-to-target (s) | ms/step | peak MiB | date |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for track in dirs(root) {
        for rec in dirs(&track) {
            let mut files: Vec<_> = std::fs::read_dir(&rec).map_err(|e| e.to_string())?.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "txt")).collect();
            files.sort();
            if files.is_empty() {
                continue;
            }
            let logs = files.iter().map(|p| parse_log(p)).collect::<Result<Vec<_>, _>>()?;
            let col = |f: &dyn Fn(&RunLog) -> Option<f64>| -> Vec<f64> { logs.iter().filter_map(f).collect() };
            let pm = |x: &[f64], prec: usize| match x.len() {
                0 => "-".to_string(),
                1 => format!("{:.prec$}", x[0]),
                _ => { let (m, s) = mean_std(x); format!("{m:.prec$} ± {s:.prec$}") }
            };
            let s = |k: &str| logs[0].summary.as_ref().and_then(|v| v.get(k)).and_then(Value::as_str).unwrap_or("-").to_string();
            let reached = col(&|l: &RunLog| l.time_to_target_ms().map(|t| t / 1e3));
            let ttt = if reached.len() == logs.len() { pm(&reached, 1) } else { format!("not reached ({}/{})", reached.len(), logs.len()) };
            let p = stats(&logs).map(|st| if st.p_value >= 1e-3 { format!("{:.4}", st.p_value) } else { format!("{:.1e}", st.p_value) }).unwrap_or("-".into());
            let name = rec.file_name().unwrap().to_string_lossy().to_string();
            let rel = rec.strip_prefix(root.parent().unwrap_or(Path::new(""))).unwrap_or(&rec).display().to_string();
            out += &format!("| {} | [{}]({}/) | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", track.file_name().unwrap().to_string_lossy(),
                name.get(11..).unwrap_or(&name), rel, logs[0].variant(), s("laplacian"), logs.len(),
                pm(&col(&RunLog::final_val_loss), 4), p, ttt, pm(&col(&RunLog::ms_per_step), 1),
                pm(&col(&|l: &RunLog| l.peak_alloc_mib), 0), name.get(..10).unwrap_or("-"));
        }
    }
    Ok(out)
}

pub fn diff_report(a: &RunLog, b: &RunLog) -> String {
    let mut o = format!("a: {} ({})\nb: {} ({})\n", a.path, a.variant(), b.path, b.variant());

    let js = |v: Option<&Value>| v.map_or("-".to_string(), Value::to_string);
    let keys: BTreeSet<&String> = a.config.keys().chain(b.config.keys()).collect();
    let cfg: Vec<String> = keys
        .into_iter()
        .filter(|k| a.config.get(*k) != b.config.get(*k))
        .map(|k| format!("  {k}: {} -> {}\n", js(a.config.get(k)), js(b.config.get(k))))
        .collect();
    o += &format!("config: {} key(s) differ\n{}", cfg.len(), cfg.concat());

    let (oa, ob) = (fn_owners(&a.source), fn_owners(&b.source));
    let (mut add, mut del, mut fns) = (0, 0, Vec::<String>::new());
    for c in TextDiff::from_lines(&a.source, &b.source).iter_all_changes() {
        let (owners, line) = match c.tag() {
            ChangeTag::Equal => continue,
            ChangeTag::Delete => {
                del += 1;
                (&oa, c.old_index())
            }
            ChangeTag::Insert => {
                add += 1;
                (&ob, c.new_index())
            }
        };
        let name = line.and_then(|i| owners.get(i).cloned().flatten()).unwrap_or_else(|| "<top level>".into());
        if !fns.contains(&name) {
            fns.push(name);
        }
    }
    o += &match add + del {
        0 => "source: identical\n".to_string(),
        _ => format!("source: +{add} -{del} lines; functions touched: {}\n", fns.join(", ")),
    };

    let bv: BTreeMap<u64, f64> = b.val.iter().map(|v| (v.0, v.2)).collect();
    let rows: Vec<String> = a
        .val
        .iter()
        .filter_map(|&(s, _, x)| bv.get(&s).map(|y| format!("{s:>8} {x:>9.4} {y:>9.4} {:>+9.4}\n", y - x)))
        .collect();
    o += &match rows.len() {
        0 => "val_loss: no matched steps\n".to_string(),
        _ => format!("val_loss at matched steps:\n{:>8} {:>9} {:>9} {:>9}\n{}", "step", "a", "b", "b-a", rows.concat()),
    };

    o += &format!("{:<18} {:>12} {:>12} {:>8}\n", "metric", "a", "b", "b/a");
    let metrics: [(&str, Metric); 4] = [
        ("time_to_target_ms", RunLog::time_to_target_ms),
        ("ms_per_step", RunLog::ms_per_step),
        ("tokens_per_s", RunLog::tokens_per_s),
        ("peak_alloc_mib", |l| l.peak_alloc_mib),
    ];
    for (name, f) in metrics {
        let (x, y) = (f(a), f(b));
        let r = x.zip(y).filter(|(x, _)| *x != 0.0).map(|(x, y)| y / x);
        o += &format!("{name:<18} {:>12} {:>12} {:>8}\n", opt(x, 2), opt(y, 2), opt(r, 3));
    }
    o
}

/// Renders into memory first and writes through a temp file + rename, so a failure leaves no partial SVG.
pub fn plot_svg(logs: &[RunLog], out: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", out.display());
    let mut svg = String::new();
    draw(logs, &mut svg).map_err(|e| err(&e))?;
    let name = out.file_name().ok_or_else(|| err(&"not a file path"))?.to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, &svg).and_then(|_| std::fs::rename(&tmp, out)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(&e)
    })
}

type XOf = fn(&(u64, f64, f64)) -> f64;

// matplotlib's tab10: distinct on white, unlike plotters' Palette99 whose third colour is a pale yellow
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn draw(logs: &[RunLog], svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels: [(&str, XOf); 2] = [("training time (s)", |v| v.1 / 1000.0), ("step", |v| v.0 as f64)];
    for (area, (xdesc, x)) in root.split_evenly((1, 2)).iter().zip(panels) {
        // log y: the step-0 loss (~10.8) would otherwise flatten the end of training, where runs differ
        let series: Vec<Vec<(f64, f64)>> = logs
            .iter()
            .map(|l| {
                l.val.iter().map(|v| (x(v), v.2)).filter(|p| p.0.is_finite() && p.1.is_finite() && p.1 > 0.0).collect()
            })
            .collect();
        let all = || series.iter().flatten();
        let lim = |f: fn(&(f64, f64)) -> f64| {
            all().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)))
        };
        if all().next().is_none() {
            return Err("no val_loss lines to plot".into());
        }
        let ((x0, x1), (y0, y1)) = (lim(|p| p.0), lim(|p| p.1));
        // plotters' own log ticks are powers of ten only, which leaves a 2..11 loss axis with one label
        let (y0, y1) = (y0 * 0.98, y1 * 1.02);
        let yticks = (-3..4)
            .flat_map(|k| [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0].map(|m| m * 10f64.powi(k)))
            .filter(|t| (y0..=y1).contains(t))
            .collect();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("val loss vs {xdesc}"), ("sans-serif", 24))
            .margin(15)
            .margin_right(35) // room for the last x label
            .x_label_area_size(50)
            .y_label_area_size(65)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0..y1).log_scale().with_key_points(yticks))?;
        chart
            .configure_mesh()
            .x_desc(xdesc)
            .y_desc("val loss")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|x| format!("{x}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        for (i, (l, pts)) in logs.iter().zip(series).enumerate() {
            let c = COLORS[i % COLORS.len()].stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts, c))?
                .label(format!("{} {}", l.label(), l.short_id()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("records-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let p = tmp(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    // The 40-dash rule is put in at run time: a literal one in this file would end the embedded source early.
    static SRC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| SRC_TEMPLATE.replace("<RULE>", &"-".repeat(40)));
    const SRC_TEMPLATE: &str = r##"use std::fmt;

/// lr schedule
fn lr(step: usize) -> f64 {
    let s = format!("{{ not a brace {}", step);
    0.02 * (1.0 - step as f64 / 1200.0)
}

trait Opt {
    fn update(&mut self, g: &[f32; 4]);
}

fn muon_step(w: &mut [f32], g: &[f32]) {
    let c = '}';
    for (a, b) in w.iter_mut().zip(g) {
        *a -= 0.02 * b;
    }
}

struct Cfg {
    steps: usize,
}

fn main() {
    let k = r#"kernel { "#;
    println!("{}", lr(0));
}
<RULE>
# kernels/foo.cu
__global__ void foo(float* x) { x[0] = 1.0f; }"##;

    fn log_text(src: &str, cfg: &str, vals: &[(u64, f64, f64)], summary: Option<&str>, header: bool) -> String {
        let eq = "=".repeat(100);
        let mut s = format!("{src}\n{eq}\n");
        if header {
            s += "rustc: rustc 1.95.0 (59807616e 2026-04-14)\ntch: 0.24.0\nlibtorch: 2.11.0\ncuda: 13.0\ngpu: NVIDIA H200\n\
                  nvidia-smi:\n+-----------------------------------------------------------------------------------------+\n\
                  | NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |\n\
                  |   0  NVIDIA H200                    On  |   00000000:19:00.0 Off |                    0 |\n";
            s += &format!("{eq}\n");
        }
        s += &format!("config: {cfg}\n");
        if header {
            s += "data: {\"train_tokens\":91322169,\"val_tokens\":890787,\"shards\":[\"a.bin\"],\"sha256\":\"ab\"}\n";
            s += "laplacian: {\"source\":\"chain\",\"nnz\":190}\ntau: 1.234\n";
        }
        for &(step, t, v) in vals {
            s += &format!("step:{step}/1200 train_time:{t}ms step_avg:130.00ms\n");
            s += &format!("step:{step}/1200 val_loss:{v} train_time:{t}ms step_avg:130.00ms\n");
            s += "diag: {\"step\":100,\"lambda_p05\":[0.1]}\n";
        }
        if let Some(sm) = summary {
            s += "peak memory allocated: 30220 MiB reserved: 38672 MiB\n";
            s += &format!("summary: {sm}\n");
        }
        s
    }

    const CFG: &str = r#"{"variant":"causal","attn":"causal","steps":1200,"lr_muon":0.02,"target_val_loss":2.0,"seed":0,"new_key":[1]}"#;
    const VALS: &[(u64, f64, f64)] =
        &[(0, 0.0, 10.8253), (100, 13000.0, 4.5476), (1100, 143000.0, 1.999), (1200, 156000.0, 1.9824)];
    const SUMMARY: &str = r#"{"variant":"causal","track":"linux-c_1xH200","steps":1200,"final_val_loss":1.9824,"target_val_loss":2.0,"time_to_target_ms":150000.0,"train_time_ms":156000.0,"ms_per_step":130.0,"tokens_per_s":504000.0,"mfu":0.2,"peak_alloc_mib":30220,"world_size":1,"laplacian_build_ms":null,"extra":{"x":1}}"#;

    #[test]
    fn parses_full_log_with_crlf() {
        let text = log_text(&SRC, CFG, VALS, Some(SUMMARY), true).replace('\n', "\r\n");
        let l = parse_log(&write("full.txt", &text)).unwrap();
        assert_eq!(l.source, *SRC);
        assert_eq!(l.config["lr_muon"], json!(0.02));
        assert_eq!(l.data.as_ref().unwrap()["train_tokens"], json!(91322169));
        assert_eq!(l.val.len(), 4);
        assert_eq!(l.val[1], (100, 13000.0, 4.5476));
        assert_eq!(l.step_avg_ms, Some(130.0));
        assert_eq!(l.peak_alloc_mib, Some(30220.0));
        let v: Vec<(&str, &str)> = l.versions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            v,
            [
                ("rustc", "rustc 1.95.0 (59807616e 2026-04-14)"),
                ("tch", "0.24.0"),
                ("libtorch", "2.11.0"),
                ("cuda", "13.0"),
                ("gpu", "NVIDIA H200"),
                ("driver", "580.65.06")
            ]
        );
        assert_eq!(l.variant(), "causal");
        assert_eq!(l.final_val_loss(), Some(1.9824));
        assert_eq!(l.time_to_target_ms(), Some(150000.0)); // from the summary, not the 143000 val line
        assert_eq!(l.train_time_ms(), Some(156000.0));
        assert_eq!(l.target(), Some(2.0));
    }

    #[test]
    fn parses_truncated_log_and_derives_from_step_lines() {
        let cfg = r#"{"attn":"tau","target_val_loss":1.999}"#; // reached exactly at step 1100
        let text = log_text("fn main() {}", cfg, &VALS[..3], None, false) + "step:1101/1200 train_ti"; // crashed mid-line
        let l = parse_log(&write("trunc.txt", &text)).unwrap();
        assert!(l.summary.is_none() && l.data.is_none() && l.versions.is_empty());
        assert_eq!(l.variant(), "tau");
        assert_eq!(l.val.len(), 3);
        assert_eq!(l.final_val_loss(), Some(1.999));
        assert_eq!(l.time_to_target_ms(), Some(143000.0));
        assert_eq!(l.train_time_ms(), Some(143000.0));
        assert_eq!(l.peak_alloc_mib, None);
        // summary says null: target not reached, even though nothing else is known
        let l = parse_log(&write("null.txt", &log_text("", "{}", &[], Some(r#"{"time_to_target_ms":null}"#), false)))
            .unwrap();
        assert_eq!((l.time_to_target_ms(), l.variant().as_str(), l.target()), (None, "unknown", None));
    }

    #[test]
    fn rejects_non_log() {
        let p = write("notes.txt", "hello\n");
        assert_eq!(
            parse_log(&p).err().unwrap(),
            format!("{}: not a train_gpt log (no '=' separator line); pass a file from logs/", p.display())
        );
    }

    fn run(name: &str, loss: f64, ttt: Option<f64>) -> RunLog {
        let ttt = ttt.map_or("null".into(), |t| t.to_string());
        let sm = format!(
            r#"{{"variant":"causal","final_val_loss":{loss},"target_val_loss":3.28,"time_to_target_ms":{ttt},"train_time_ms":1000.0}}"#
        );
        parse_log(&write(name, &log_text("", "{}", &[], Some(&sm), false))).unwrap()
    }

    #[test]
    fn welch_without_spread() {
        assert_eq!(welch(&[5.0, 5.0], &[5.0, 5.0, 5.0]).unwrap(), (0.0, 3.0, 1.0));
        assert_eq!(welch(&[4.0, 4.0], &[5.0, 5.0]).unwrap(), (f64::NEG_INFINITY, 2.0, 0.0));
    }

    #[test]
    fn welch_matches_scipy() {
        // scipy 1.17.1: stats.ttest_ind(a, b, equal_var=False) -> statistic, pvalue, df
        let cases: [(&[f64], &[f64], f64, f64, f64); 2] = [
            (&[2.0163, 2.0078, 1.9766], &[3.3666, 3.3777, 3.3452], -88.60267806607668, 1.9451275655668673e-07, 3.7971790007406008),
            (&[3.279, 3.2785, 3.2778, 3.2792, 3.2781], &[3.2801, 3.2810, 3.2795, 3.2806], -4.262326969235371, 0.00486629538893782, 6.233818191506601),
        ];
        for (a, b, t, p, df) in cases {
            let (t1, df1, p1) = welch(a, b).unwrap();
            assert!((t1 - t).abs() < 1e-9 * t.abs() && (df1 - df).abs() < 1e-9 * df && (p1 - p).abs() < 1e-6 * p, "{t1} {df1} {p1}");
        }
        assert!(welch(&[1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn t_test_matches_scipy() {
        // Expected values from scipy 1.17.1:
        //   scipy.stats.ttest_1samp([3.279, 3.2785, 3.2778, 3.2792, 3.2781], 3.28, alternative='less')
        //   -> statistic=-5.618003173209976, pvalue=0.0024672206297135144; numpy std(ddof=1)=0.0005890670590008984
        let losses = [3.279, 3.2785, 3.2778, 3.2792, 3.2781];
        let logs: Vec<RunLog> =
            losses.iter().enumerate().map(|(i, &x)| run(&format!("r{i}.txt"), x, Some(900.0 + i as f64))).collect();
        let s = stats(&logs).unwrap();
        assert_eq!((s.n, s.time_kind, s.target), (5, "time_to_target_ms", 3.28));
        assert!((s.loss_mean - 3.27852).abs() < 1e-12);
        assert!((s.loss_std - 0.0005890670590008984).abs() < 1e-12);
        assert!((s.t - -5.618003173209976).abs() < 1e-9, "t={}", s.t);
        assert!((s.p_value - 0.0024672206297135144).abs() < 1e-9, "p={}", s.p_value);
        assert_eq!((s.time_mean, s.time_std), (902.0, 2.5f64.sqrt()));
        let r = stats_report(&s);
        assert!(r.contains("t: -5.6180\np_value: 0.0025\n") && r.contains("time_to_target_ms_mean: 902.0"), "{r}");
        let j: Value = serde_json::from_str(r.lines().last().unwrap().strip_prefix("stats: ").unwrap()).unwrap();
        assert_eq!(j["n"], json!(5));
        // one run missed the target: times fall back to train_time_ms
        let mut logs = logs;
        logs.push(run("miss.txt", 3.29, None));
        assert_eq!(stats(&logs).unwrap().time_kind, "train_time_ms");
    }

    #[test]
    fn stats_errors() {
        let a = run("e1.txt", 3.27, Some(1.0));
        assert!(stats(std::slice::from_ref(&a)).unwrap_err().contains("at least 2"));
        let mut b = run("e2.txt", 3.27, Some(1.0));
        b.summary.as_mut().unwrap()["variant"] = json!("tau");
        assert_eq!(stats(&[a, b]).err().unwrap(), "stats: mixed variants (causal, tau); pass logs of one variant");
        let (a, mut b) = (run("e3.txt", 3.27, Some(1.0)), run("e4.txt", 3.27, Some(1.0)));
        b.summary.as_mut().unwrap()["target_val_loss"] = json!(3.3);
        assert!(stats(&[a, b]).unwrap_err().contains("mixed targets (3.28, 3.3)"));
    }

    #[test]
    fn fn_owners_track_bodies() {
        let o = fn_owners(&SRC);
        let at = |needle: &str| o[SRC.lines().position(|l| l.contains(needle)).unwrap()].as_deref();
        assert_eq!(at("not a brace"), Some("lr"));
        assert_eq!(at("0.02 * (1.0"), Some("lr"));
        assert_eq!(at("steps: usize"), None); // struct between functions
        assert_eq!(at("fn update"), Some("update"));
        assert_eq!(at("trait Opt"), None);
        assert_eq!(at("*a -= 0.02"), Some("muon_step")); // after a '}' char literal
        assert_eq!(at("println!"), Some("main")); // after a raw string with a brace
        assert_eq!(at("__global__"), Some("kernels/foo.cu"));
    }

    #[test]
    fn diff_names_key_and_function() {
        // 3 lines become 1, so old and new line numbers disagree after the change
        let loop_a = "for (a, b) in w.iter_mut().zip(g) {\n        *a -= 0.02 * b;\n    }";
        let src_b = SRC.replace(loop_a, "w.iter_mut().zip(g).for_each(|(a, b)| *a -= 0.03 * b);");
        assert_ne!(src_b, *SRC);
        let a = parse_log(&write("da.txt", &log_text(&SRC, CFG, VALS, Some(SUMMARY), true))).unwrap();
        let b = parse_log(&write("db.txt", &log_text(&src_b, &CFG.replace("0.02", "0.03"), &VALS[..2], None, false)))
            .unwrap();
        let r = diff_report(&a, &b);
        assert!(r.contains("config: 1 key(s) differ\n  lr_muon: 0.02 -> 0.03\n"), "{r}");
        assert!(r.contains("source: +1 -3 lines; functions touched: muon_step\n"), "{r}");
        assert!(r.contains("     100    4.5476    4.5476   +0.0000\n") && !r.contains("    1200 "), "{r}");
        assert!(r.contains("ms_per_step              130.00       130.00    1.000\n"), "{r}");
        assert!(r.contains("tokens_per_s          504000.00            -        -\n"), "{r}");
        // a key present on one side only
        let mut c = parse_log(&write("dc.txt", &log_text(&SRC, CFG, VALS, None, false))).unwrap();
        c.config.remove("seed");
        assert!(diff_report(&a, &c).contains("  seed: 0 -> -\n"));
        assert!(diff_report(&a, &c).contains("source: identical\n"));
    }

    #[test]
    fn plot_writes_svg_atomically() {
        let a = parse_log(&write("pa.txt", &log_text(&SRC, CFG, VALS, Some(SUMMARY), true))).unwrap();
        let mut b = parse_log(&write("pb.txt", &log_text(&SRC, &CFG.replace("causal", "tau"), &VALS[..3], None, false)))
            .unwrap();
        b.val.iter_mut().for_each(|v| v.2 += 0.1);
        let out = tmp("plot.svg");
        plot_svg(&[a, b], &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..50]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let texts: Vec<&str> = svg.lines().map(str::trim).collect(); // plotters puts <text> content on its own line
        for t in ["causal pa", "tau pb", "val loss vs step", "training time (s)", "val loss", "2.5", "10"] {
            assert!(texts.contains(&t), "no text {t:?}");
        }
        // each log: one curve per panel + one legend swatch per panel, in its own colour
        for RGBColor(r, g, b) in &COLORS[..2] {
            let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
            assert_eq!(
                svg.lines().filter(|l| l.starts_with("<polyline") && l.contains(&stroke)).count(),
                4,
                "{stroke}"
            );
        }
        let [a, b] = [out.parent().unwrap().join("no-such-dir/plot.svg"), tmp("empty.svg")];
        assert!(plot_svg(&[], &b).is_err()); // nothing to plot
        assert!(plot_svg(&[parse_log(&write("pc.txt", &log_text(&SRC, CFG, VALS, None, false))).unwrap()], &a).is_err());
        assert!(!a.exists() && !b.exists() && !a.parent().unwrap().exists());
        let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty());
    }
}
}

// ----------------------------------------------------------------------------------------------------------------
// Checkpoints (safetensors: names in the README, config in the metadata) and sampling

fn save_checkpoint(m: &Model, path: &Path) -> Res<()> {
    let mut named: Vec<(String, Tensor)> = m.params.iter().map(|(n, p)| (n.clone(), p.detach().to(Device::Cpu).contiguous())).collect();
    if m.cfg.is_tau() {
        named.push(("laplacian".into(), m.lap.to(Device::Cpu)));
        named.push(("tau".into(), Tensor::from_slice(&[m.tau as f32])));
        if m.cfg.attn == "tau" {
            named.push(("inv_temp".into(), m.inv_temp.to(Device::Cpu)));
        }
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = named.iter().map(|(n, t)| {
        let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), t.size().iter().map(|&s| s as usize).collect())
    }).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes.iter()
        .map(|(n, b, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    let meta = std::collections::HashMap::from([("config".to_string(), serde_json::to_string(&m.cfg).unwrap())]);
    let tmp = path.with_extension("partial");
    safetensors::tensor::serialize_to_file(views, &Some(meta), &tmp).map_err(|e| format!("{}: cannot write checkpoint ({e:?})", path.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_checkpoint(path: &Path, dev: Device) -> Res<Model> {
    let p = path.display();
    let bytes = fs::read(path).map_err(|e| format!("{p}: {e}; pass a file written by --save-checkpoint"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format!("{p}: not a safetensors file ({e:?})"))?;
    let cfg: ModelCfg = meta.metadata().as_ref().and_then(|m| m.get("config")).and_then(|c| serde_json::from_str(c).ok())
        .ok_or(format!("{p}: no train_gpt config in the metadata; pass a file written by --save-checkpoint"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{p}: {e:?}"))?;
    let get = |n: &str| -> Res<Tensor> {
        let v = st.tensor(n).map_err(|_| format!("{p}: tensor {n} missing"))?;
        let f: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Tensor::from_slice(&f).view(v.shape().iter().map(|&s| s as i64).collect::<Vec<_>>().as_slice()).to(dev))
    };
    let cdt = compute_kind("auto", dev)?;
    let lap = if cfg.is_tau() { Some(get("laplacian")?) } else { None };
    let tau = if cfg.is_tau() { get("tau")?.double_value(&[0]) } else { 1.0 };
    let mut m = Model::new(cfg, dev, cdt, lap, tau, 1.0, 1.0);
    if m.cfg.attn == "tau" {
        m.inv_temp = get("inv_temp")?;
    }
    for (n, w) in m.params.iter_mut() {
        *w = get(n)?;
    }
    Ok(m)
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
                let k = p.iter().position(|&pi| { acc += pi; acc > u }).unwrap_or(p.len() - 1);
                i.int64_value(&[k as i64])
            };
            ids.push(next);
        }
    });
    Ok(ids[prompt.len()..].to_vec())
}

fn decode_ids(ids: &[i64]) -> Res<String> {
    tokenizer().decode(&ids.iter().map(|&x| x as u32).collect::<Vec<_>>()).map_err(|e| format!("decode failed: {e}"))
}

// Cached greedy decoding of a [B,P] prompt for g tokens: (prefill ms, per-token ms, cache bytes at the end by its
// buffers, cache bytes the CUDA allocator gives back when it is dropped).
fn decode_timed(m: &Model, prompt: &Tensor, g: i64) -> (f64, Vec<f64>, i64, Option<i64>) {
    let dev = prompt.device();
    let mut cache = Cache::new(m.cfg.n_layer, prompt.size()[1] + g);
    tch::no_grad(|| {
        let t0 = Instant::now();
        let mut h = m.forward(prompt, Some(&mut cache), None);
        sync(dev);
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let mut steps = vec![];
        for _ in 0..g {
            let t = Instant::now();
            let z = m.logits(&h.narrow(1, -1, 1));
            let next = z.narrow(2, 0, GPT2_VOCAB.min(m.cfg.vocab_size)).argmax(2, false);
            h = m.forward(&next, Some(&mut cache), None);
            sync(dev);
            steps.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (bytes, held) = (cache.bytes(), memory_allocated(dev));
        drop(cache);
        (prefill, steps, bytes, held.zip(memory_allocated(dev)).map(|(a, b)| a - b))
    })
}

// What the cache must hold: causal K and V in the compute dtype; tau V in the compute dtype plus one fp32 λk a head.
fn cache_bytes_formula(cfg: &ModelCfg, cdt: Kind, b: i64, t: i64) -> i64 {
    let (per_head, s) = (cfg.n_layer * b * cfg.kv_heads() * t, cdt.elt_size_in_bytes() as i64);
    if cfg.is_tau() { per_head * (cfg.head_dim() * s + 4) } else { per_head * 2 * cfg.head_dim() * s }
}

fn cmd_bench_decode(a: &BenchDecodeArgs) -> Res<()> {
    let dev = pick_device(&a.device)?;
    let mut models = a.checkpoint.iter().map(|p| load_checkpoint(p, dev)).collect::<Res<Vec<_>>>()?;
    for m in models.iter_mut() {
        check_kernels(a.kernels, 0, dev, m.cfg.head_dim())?;
        m.kernels = a.kernels;
    }
    let (mut rows, t0) = (vec![], Instant::now());
    // Medians over the runs, so that one disturbed run does not move the figures.
    let median = |mut v: Vec<f64>| { v.sort_by(f64::total_cmp); v[v.len() / 2] };
    // Each shape for every checkpoint in turn, so that a cut-short bench still compares the variants.
    for &b in &a.batch_sizes {
        for &p in &a.prompt_lens {
            for &g in &a.gen_lens {
                if p < 1 || g < 1 || b < 1 {
                    return Err(format!("sizes must be ≥ 1 (batch {b}, prompt {p}, gen {g})"));
                }
                for (m, path) in models.iter_mut().zip(&a.checkpoint) {
                    // Past the trained context the tokens are meaningless but the cost is real: longer RoPE tables.
                    if p + g > m.cos.size()[0] {
                        (m.cos, m.sin) = rope_tables(m.cfg.head_dim(), p + g, dev);
                    }
                    tch::manual_seed(0);
                    let prompt = Tensor::randint(GPT2_VOCAB.min(m.cfg.vocab_size), [b, p], (Kind::Int64, dev));
                    let _ = decode_timed(m, &prompt, g.min(64)); // warm-up: allocator, cuBLAS/SDPA kernel choice
                    let runs: Vec<(f64, Vec<f64>, i64, Option<i64>)> = (0..a.repeats.max(1)).map(|_| decode_timed(m, &prompt, g)).collect();
                    let tps = median(runs.iter().map(|r| (b * g) as f64 / (r.1.iter().sum::<f64>() / 1e3)).collect());
                    let marks: Vec<usize> = (0..8).map(|i| i * (g as usize - 1) / 7).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                    let per_pos: Vec<Value> = marks.iter().map(|&i| json!([p + i as i64, round4(median(runs.iter().map(|r| r.1[i]).collect()))])).collect();
                    let row = json!({"attn": m.cfg.attn, "device": format!("{dev:?}"), "gpu": gpu_name(dev), "batch": b, "prompt_len": p, "gen_len": g,
                        "beyond_trained_context": p + g > m.cfg.seq_len,
                        "tokens_per_s": round4(tps), "prefill_ms": round4(median(runs.iter().map(|r| r.0).collect())),
                        "ms_per_token_at_position": per_pos, "cache_bytes": runs[0].2, "cache_bytes_allocated": runs[0].3, "cache_bytes_formula": cache_bytes_formula(&m.cfg, m.cdt, b, p + g),
                        "checkpoint": path.display().to_string(), "kernels": m.kernels, "bench_elapsed_s": round4(t0.elapsed().as_secs_f64())});
                    println!("{row}");
                    rows.push(row);
                }
            }
        }
    }
    if let Some(out) = &a.out {
        write_atomic(out, serde_json::to_string_pretty(&rows).unwrap().as_bytes())?;
    }
    Ok(())
}

fn cmd_sample(a: &SampleArgs) -> Res<()> {
    let dev = pick_device(&a.device)?;
    let mut m = load_checkpoint(&a.checkpoint, dev)?;
    check_kernels(a.kernels, 0, dev, m.cfg.head_dim())?;
    m.kernels = a.kernels;
    let prompt: Vec<i64> = tokenizer().encode_ordinary(&a.prompt).into_iter().map(|x| x as i64).collect();
    if prompt.is_empty() {
        return Err("--prompt is empty after tokenization; pass some text".into());
    }
    print!("{}", a.prompt);
    println!("{}", decode_ids(&generate(&m, &prompt, a.tokens, a.temperature, a.top_k, a.seed, !a.no_cache)?)?);
    Ok(())
}

// ----------------------------------------------------------------------------------------------------------------
// main

fn cmd_stats(logs: &[PathBuf], vs: &[PathBuf]) -> Res<()> {
    let (a, b) = (parse_logs(logs)?, parse_logs(vs)?); // every log read before anything is printed
    let mut out = records::stats_report(&records::stats(&a)?);
    if !b.is_empty() {
        out += &records::compare_report(&a, &b)?;
    }
    println!("{out}");
    Ok(())
}

fn parse_logs(paths: &[PathBuf]) -> Res<Vec<records::RunLog>> {
    paths.iter().map(|p| records::parse_log(p)).collect()
}

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
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => e.exit(),
        Err(e) => {
            let first = e.to_string().lines().next().unwrap_or("bad arguments").trim_start_matches("error: ").to_string();
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
        Cmd::Train(a) => cmd_train(a, matches.subcommand_matches("train").unwrap()),
        Cmd::Prepare(a) => cmd_prepare(&a),
        Cmd::Sample(a) => cmd_sample(&a),
        Cmd::Stats { logs, vs } => cmd_stats(&logs, &vs),
        Cmd::Diff { a, b } => parse_logs(&[a, b]).map(|l| println!("{}", records::diff_report(&l[0], &l[1]))),
        Cmd::Plot { logs, out } => parse_logs(&logs).and_then(|l| records::plot_svg(&l, &out)).map(|_| println!("wrote {}", out.display())),
        Cmd::RecordsTable { root } => records::records_table(&root).map(|t| print!("{t}")),
        Cmd::Bench(a) => cmd_bench(a, matches.subcommand_matches("bench").unwrap()),
        Cmd::BenchDecode(a) => cmd_bench_decode(&a),
        Cmd::DistCheck(a) => cmd_dist_check(&a),
        Cmd::HasCuda => std::process::exit(if tch::Cuda::is_available() { 0 } else { 1 }),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Tests (CPU). Command-line tests live in tests/cli.rs.

// Tests: the mean loss over (x, y) and every parameter's gradient, from zeroed gradients, through the training
// path (`micro` rows at a time, the head `head_chunk` rows at a time; 0: all at once).
#[cfg(test)]
impl Model {
    fn loss_and_grads(&mut self, x: &Tensor, y: &Tensor, micro: i64, head_chunk: i64) -> (f64, Vec<Tensor>) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
        let loss = backward_micro_batches(self, x, y, micro, head_chunk).double_value(&[]);
        (loss, self.params.iter().map(|(_, p)| p.grad().copy()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("train_gpt-unit-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    // (variant, n_kv_head): full heads and grouped-query attention
    const VARIANTS: [(&str, i64); 5] = [("causal", 0), ("tau", 0), ("tau-lt", 0), ("causal", 1), ("tau", 1)];

    #[test]
    fn a_model_with_chunked_tau_attention_is_the_same_model() {
        for attn in ["tau", "tau-lt"] {
            let mut m = small(attn, 512);
            let (x, y) = (Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)));
            let mut run = |chunk: i64| {
                m.tau_chunk = chunk;
                m.loss_and_grads(&x, &y, 0, 0)
            };
            let (l0, g0) = run(0);
            let (l1, g1) = run(5);
            assert!((l0 - l1).abs() < 1e-5, "{attn}: {l0} vs {l1}");
            for (a, b) in g0.iter().zip(&g1) {
                assert!((a - b).abs().max().double_value(&[]) < 1e-5 * (1.0 + a.abs().max().double_value(&[])), "{attn}");
            }
        }
    }

    fn small(attn: &str, vocab: i64) -> Model {
        small_kv(attn, vocab, 0)
    }

    // n_kv_head 1 of 2 query heads: grouped-query attention
    fn small_kv(attn: &str, vocab: i64, n_kv_head: i64) -> Model {
        tch::manual_seed(0);
        let cfg = ModelCfg { n_layer: 2, n_head: 2, n_kv_head, n_embd: 32, seq_len: 16, vocab_size: vocab, attn: attn.into() };
        let lap = (attn != "causal").then(|| chain_laplacian(16));
        let mut m = Model::new(cfg, Device::Cpu, Kind::Float, lap, 1.0, 0.5, 20.0);
        // Zero-initialised output projections would hide attention entirely at init: perturb them for the tests.
        for (n, p) in m.params.iter_mut() {
            if n.ends_with(".o") || n.ends_with(".proj") {
                tch::no_grad(|| p.copy_(&(p.randn_like() * 0.05)));
            }
        }
        m
    }

    fn args(list: &[&str]) -> TrainArgs {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: TrainArgs,
        }
        P::parse_from(std::iter::once("t").chain(list.iter().copied())).a
    }

    fn eig(l: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&l.to_kind(Kind::Double).linalg_eigvalsh("L")).unwrap()
    }

    fn decode(ids: &[u16]) -> String {
        tokenizer().decode(&ids.iter().map(|&x| x as u32).collect::<Vec<_>>()).unwrap()
    }

    // Documents of a split, read back from its shards: split at EOT, decoded.
    fn read_docs(dir: &Path, split: &str) -> Vec<String> {
        let toks: Vec<u16> = shard_paths(dir, split).iter().flat_map(|p| read_shard(p).unwrap()).collect();
        assert_eq!(toks[0], EOT, "every document starts with EOT");
        toks.split(|&t| t == EOT).skip(1).map(decode).collect()
    }

    #[test]
    fn prepare_round_trip_plain_text() {
        let src = tmp("txt");
        fs::create_dir_all(&src).unwrap();
        let books = ["Call me Ishmael.\r\n\r\nSome years ago—never mind how long precisely—\r\n".repeat(40), "Alice was beginning to get very tired.\n\n".repeat(50)];
        for (i, b) in books.iter().enumerate() {
            fs::write(src.join(format!("{i}.txt")), b).unwrap();
        }
        let out = tmp("txt-out");
        cmd_prepare(&PrepareArgs { input: src.clone(), out: out.clone() }).unwrap();
        let (train, val) = (read_docs(&out, "train"), read_docs(&out, "val"));
        assert_eq!((train.len(), val.len()), (2, 2));
        for i in 0..2 {
            assert_eq!(format!("{}{}", train[i], val[i]), books[i], "train + val part of a file is the file");
            assert!(val[i].len() as f64 <= books[i].len() as f64 * 0.06 && !val[i].is_empty(), "val is the last ~5%");
            assert!(val[i].starts_with("\r\n\r\n") || val[i].starts_with("\n\n"), "the cut falls on a blank line");
        }
        let again = tmp("txt-out2");
        cmd_prepare(&PrepareArgs { input: src, out: again.clone() }).unwrap();
        assert_eq!(fs::read(out.join("train_000000.bin")).unwrap(), fs::read(again.join("train_000000.bin")).unwrap(), "deterministic");
        let e = cmd_prepare(&PrepareArgs { input: tmp("txt"), out }).unwrap_err();
        assert!(e.contains("already holds shards"), "{e}");
    }

    #[test]
    fn prepare_round_trip_jsonl_zst_keeps_split() {
        let docs = [("a.c", "train", "int main(void) { return 0; }\n"), ("b.c", "val", "/* é ü */ static int x;\n"), ("c.h", "train", "#define N 3\n")];
        let jsonl: String = docs.iter().map(|(p, s, t)| format!("{}\n", json!({"path": p, "split": s, "text": t}))).collect();
        let path = tmp("docs.jsonl.zst");
        fs::write(&path, zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
        let out = tmp("jsonl-out");
        cmd_prepare(&PrepareArgs { input: path, out: out.clone() }).unwrap();
        assert_eq!(read_docs(&out, "train"), vec![docs[0].2, docs[2].2]);
        assert_eq!(read_docs(&out, "val"), vec![docs[1].2]);
        let bad = tmp("bad.jsonl");
        fs::write(&bad, "{\"path\": \"x\", \"split\": \"test\", \"text\": \"y\"}\n").unwrap();
        let e = cmd_prepare(&PrepareArgs { input: bad, out: tmp("bad-out") }).unwrap_err();
        assert!(e.contains("split \"test\"") && !e.contains('\n'), "{e}");
        let e = cmd_prepare(&PrepareArgs { input: tmp("corrupt.zst"), out: tmp("c-out") }).unwrap_err();
        assert!(e.contains("corrupt.zst") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn shard_header_errors() {
        let good = tmp("good.bin");
        write_shard(&good, &[EOT, 1, 2, 3]).unwrap();
        assert_eq!(read_shard(&good).unwrap(), vec![EOT, 1, 2, 3]);
        let bytes = fs::read(&good).unwrap();
        let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            f(&mut b);
            let p = tmp(name);
            fs::write(&p, b).unwrap();
            let e = read_shard(&p).unwrap_err();
            assert!(!e.contains('\n') && e.contains("prepare"), "{e}");
            e
        };
        assert!(variant("magic.bin", &|b| b[0] ^= 1).contains("magic"));
        assert!(variant("version.bin", &|b| b[4] = 7).contains("version 7"));
        assert!(variant("short.bin", &|b| b.truncate(1030)).contains("truncated"));
        assert!(variant("long.bin", &|b| b.extend_from_slice(&[0, 0])).contains("truncated or corrupt"));
        assert!(variant("tiny.bin", &|b| b.truncate(10)).contains("header"));
        assert!(read_shard(&tmp("absent.bin")).unwrap_err().contains("prepare"));
    }

    #[test]
    fn held_out_split_is_deterministic_and_cuts_at_blank_line() {
        let text = "para one.\n\npara two is longer.\n\n".repeat(30);
        let (a, b) = split_held_out(&text);
        assert_eq!(format!("{a}{b}"), text);
        assert!(b.starts_with("\n\n") && a.len() >= (text.len() as f64 * 0.95) as usize);
        assert_eq!(split_held_out(&text), (a, b));
    }

    #[test]
    fn forward_shapes() {
        for (attn, kv) in VARIANTS {
            let m = small_kv(attn, 512, kv);
            let idx = Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu));
            let x = m.hidden(&idx, None);
            assert_eq!(x.size(), [3, 16, 32]);
            assert_eq!(m.logits(&x).size(), [3, 16, 512]);
            let z = m.logits(&x);
            assert!(f64::try_from(z.abs().max()).unwrap() <= SOFTCAP, "soft-capped");
            assert_eq!(m.loss(&idx, &idx, Reduction::Mean).size(), Vec::<i64>::new());
        }
    }

    #[test]
    fn the_embedded_source_has_no_log_separator_lines() {
        // a log splits at its first 100-'=' line and at 40-'-' lines: the harness's own source and kernels must hold neither
        let lines = SOURCE.lines().chain(KERNEL_FILES.iter().flat_map(|(_, text)| text.lines()));
        assert!(!lines.map(str::trim_end).any(|l| l == "=".repeat(100) || l == "-".repeat(40)));
    }

    #[test]
    fn parameter_count_of_the_speedrun_model() {
        let cfg = ModelCfg { n_layer: 6, n_head: 6, n_kv_head: 0, n_embd: 384, seq_len: 1024, vocab_size: 50304, attn: "causal".into() };
        assert_eq!(Model::new(cfg, Device::Cpu, Kind::Float, None, 1.0, 1.0, 20.0).n_params(), 29_933_568);
    }

    #[test]
    fn causality() {
        for (attn, kv) in VARIANTS {
            let m = small_kv(attn, 512, kv);
            let idx = Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu));
            let j = 9;
            let changed = idx.copy();
            let _ = changed.narrow(1, j, 1).copy_(&(idx.narrow(1, j, 1) + 1).remainder(512));
            let (a, b) = tch::no_grad(|| (m.logits(&m.hidden(&idx, None)), m.logits(&m.hidden(&changed, None))));
            let past = (a.narrow(1, 0, j) - b.narrow(1, 0, j)).abs().max().double_value(&[]);
            let now = (a.narrow(1, j, 16 - j) - b.narrow(1, j, 16 - j)).abs().max().double_value(&[]);
            assert!(past < 1e-5, "{attn}: a later token changed an earlier logit by {past}");
            assert!(now > 1e-4, "{attn}: the changed token must matter from its position on");
        }
    }

    #[test]
    fn loss_at_init_is_ln_vocab() {
        let m = small("causal", 50304);
        let idx = Tensor::randint(50304, [4, 16], (Kind::Int64, Device::Cpu));
        let l = tch::no_grad(|| m.loss(&idx, &idx.roll([1], [1]), Reduction::Mean)).double_value(&[]);
        assert!((l - (50304f64).ln()).abs() < 0.05, "init loss {l} vs ln V {}", (50304f64).ln());
    }

    #[test]
    fn a_few_steps_on_one_batch_lower_its_loss() {
        for (attn, kv) in [("causal", 0), ("tau-lt", 0), ("tau-lt", 1)] {
            let mut m = small_kv(attn, 512, kv);
            let a = args(&["--warmup-steps", "1"]);
            let mut opt = Optim::new(&m);
            let (x, y) = (Tensor::randint(512, [4, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(512, [4, 16], (Kind::Int64, Device::Cpu)));
            let first = m.loss(&x, &y, Reduction::Mean).double_value(&[]);
            for _ in 0..15 {
                let _ = train_step(&mut m, &mut opt, &x, &y, &a, 1.0, None).unwrap();
            }
            let last = m.loss(&x, &y, Reduction::Mean).double_value(&[]);
            assert!(last < first - 1.0, "{attn}: loss {first} -> {last}");
        }
    }

    #[test]
    fn muon_shards_over_ranks_add_up_to_the_whole_update() {
        let m = small("causal", 512);
        let (x, y) = (Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)));
        m.loss(&x, &y, Reduction::Mean).backward();
        let a = args(&[]);
        let whole = Optim::new(&m).muon_updates(&a, 1.0, Kind::Float, 0, 1);
        // 2 layers: two matrices of each of the 4 shapes. 2 ranks get one of each; a third rank gets none.
        for (world, idle) in [(2, 0), (3, 1)] {
            let shards: Vec<Tensor> = (0..world).map(|r| Optim::new(&m).muon_updates(&a, 1.0, Kind::Float, r, world)).collect();
            // every element is owned by exactly one rank; the sum is the single-rank update
            let owners = shards.iter().map(|s| s.ne(0.0).to_kind(Kind::Int64)).fold(Tensor::zeros_like(&whole).to_kind(Kind::Int64), |acc, o| acc + o);
            assert_eq!(owners.max().int64_value(&[]), 1);
            assert_eq!(shards.iter().filter(|s| Tensor::ne(s, 0.0).any().int64_value(&[]) == 0).count(), idle, "world {world}");
            let sum = shards.iter().fold(Tensor::zeros_like(&whole), |acc, s| acc + s);
            assert!((sum - &whole).abs().max().double_value(&[]) < 1e-6, "world {world}");
        }
    }

    #[test]
    fn chunked_head_matches_autograd() {
        for attn in ["causal", "tau-lt"] {
            let mut m = small(attn, 512);
            // large logits, so that the soft cap's slope (1 − t²) is far from 1 and must be right
            tch::no_grad(|| { let w = &mut m.params[0].1; let big = &*w * 50.0; w.copy_(&big) });
            let (x, y) = (Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu)));
            let (l0, g0) = m.loss_and_grads(&x, &y, 0, 0);
            for chunk in [7, 48, 1000] {
                let (l1, g1) = m.loss_and_grads(&x, &y, 0, chunk);
                assert!((l0 - l1).abs() < 1e-5, "{attn} chunk {chunk}: loss {l0} vs {l1}");
                for ((n, _), (a, b)) in m.params.iter().zip(g0.iter().zip(&g1)) {
                    let err = (a - b).abs().max().double_value(&[]) / (a.abs().max().double_value(&[]) + 1e-12);
                    assert!(err < 1e-4, "{attn} chunk {chunk}: {n} differs by {err} (relative)");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "cross-entropy (fused): z and y must be on one CUDA device")]
    fn fused_cross_entropy_refuses_cpu_tensors() {
        let _ = softcap_ce_fused(&mut Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)), &Tensor::zeros([2], (Kind::Int64, Device::Cpu)), 1.0, true);
    }

    #[test]
    fn ranks_split_the_batch_and_the_val_set_without_gaps() {
        for (n, world) in [(64, 1), (64, 2), (64, 8), (869, 2), (869, 3)] {
            let blocks: Vec<(i64, i64)> = (0..world).map(|r| rank_rows(n, r, world)).collect();
            assert_eq!(blocks[0].0, 0);
            for w in blocks.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous");
            }
            assert_eq!(blocks.last().map(|b| b.0 + b.1), Some(n), "everything covered");
        }
        // two ranks read the same tokens as one, half each
        let toks = device_tokens(&(0..5000u16).collect::<Vec<_>>(), Device::Cpu);
        let (whole, next) = train_batch(&toks, 3, 8, 16, 0, 1);
        // step 3 of 8×16 starts at token 3·128 = 384; the targets are the inputs one token on
        assert_eq!((whole.kind(), whole.size(), whole.int64_value(&[0, 0]), whole.int64_value(&[7, 15])), (Kind::Int64, vec![8, 16], 384, 511));
        assert!(next.equal(&(&whole + 1)));
        let halves: Vec<Tensor> = (0..2).map(|r| train_batch(&toks, 3, 8, 16, r, 2).0).collect();
        assert!(Tensor::cat(&halves, 0).equal(&whole));
    }

    #[test]
    fn torchrun_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(dist_env(env(&[])).unwrap(), None);
        assert_eq!(dist_env(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let e = dist_env(env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")])).unwrap().unwrap();
        assert_eq!(e, DistEnv { rank: 2, world: 4, local_rank: 2, addr: "10.0.0.1".into(), port: 1234 });
        assert!(dist_env(env(&[("WORLD_SIZE", "2")])).unwrap_err().contains("RANK is unset"));
        assert!(dist_env(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err().contains("0 ≤ RANK < WORLD_SIZE"));
        assert!(dist_env(env(&[("WORLD_SIZE", "two"), ("RANK", "0")])).unwrap_err().contains("not a number"));
    }

    #[test]
    fn micro_batches_accumulate_the_same_gradient() {
        let mut m = small("tau-lt", 512);
        let (x, y) = (Tensor::randint(512, [8, 16], (Kind::Int64, Device::Cpu)), Tensor::randint(512, [8, 16], (Kind::Int64, Device::Cpu)));
        let (l0, g0) = m.loss_and_grads(&x, &y, 0, 0);
        for (micro, chunk) in [(2, 0), (4, 0), (1, 5)] {
            let (l1, g1) = m.loss_and_grads(&x, &y, micro, chunk);
            assert!((l0 - l1).abs() < 1e-5, "micro {micro}: loss {l0} vs {l1}");
            for (a, b) in g0.iter().zip(&g1) {
                assert!((a - b).abs().max().double_value(&[]) <= 1e-5 * (1.0 + a.abs().max().double_value(&[])), "micro {micro} chunk {chunk}");
            }
        }
    }

    #[test]
    fn newton_schulz_singular_values_near_one() {
        tch::manual_seed(1);
        for (r, c) in [(64, 32), (32, 96), (48, 48)] {
            // an ill-conditioned input: singular values spread over two decades (5 steps lift σ ≥ ~1e-3·‖G‖)
            let (u, _, v) = Tensor::randn([r, c], (Kind::Double, Device::Cpu)).svd(true, true);
            let s = Tensor::logspace(0.0, -2.0, r.min(c), 10.0, (Kind::Double, Device::Cpu));
            let g = (u * s.unsqueeze(0)).matmul(&v.tr()).to_kind(Kind::Float);
            let sv = Vec::<f64>::try_from(newton_schulz(&g, 5, Kind::Float).to_kind(Kind::Double).svd(true, false).1).unwrap();
            assert_eq!(newton_schulz(&g, 5, Kind::Float).size(), [r, c]);
            assert!(sv.iter().all(|&x| (0.6..1.25).contains(&x)), "{r}x{c}: {sv:?}");
            // a stack goes through as its matrices one by one (each with its own norm: the second is 10× the first)
            let stack = newton_schulz(&Tensor::stack(&[&g, &(&g.flip([0]) * 10.0)], 0), 5, Kind::Float);
            for (k, m) in [g.shallow_clone(), &g.flip([0]) * 10.0].iter().enumerate() {
                let err = (stack.get(k as i64) - newton_schulz(m, 5, Kind::Float)).abs().max().double_value(&[]);
                assert!(err < 1e-5, "{r}x{c} stack {k}: {err}");
            }
        }
    }

    #[test]
    fn lr_schedule_warms_up_holds_and_cools_to_zero() {
        let a = args(&["--steps", "100", "--warmup-steps", "10", "--cooldown-frac", "0.4"]);
        assert!((lr_mult(&a, 0) - 0.1).abs() < 1e-12 && lr_mult(&a, 9) == 1.0 && lr_mult(&a, 59) == 1.0);
        assert!((lr_mult(&a, 60) - 1.0).abs() < 1e-12 && (lr_mult(&a, 80) - 0.5).abs() < 1e-12 && lr_mult(&a, 99) > 0.0 && lr_mult(&a, 100) == 0.0);
    }

    #[test]
    fn lambda_in_unit_interval_and_scale_invariant() {
        let lap = chain_laplacian(16);
        let x = Tensor::randn([2, 3, 10, 16], (Kind::Float, Device::Cpu));
        let (e, lam) = taumode(&x, &lap, 0.7);
        assert_eq!(lam.size(), [2, 3, 10]);
        assert!(e.min().double_value(&[]) >= 0.0, "L is PSD, so E ≥ 0");
        assert!(lam.min().double_value(&[]) >= 0.0 && lam.max().double_value(&[]) < 1.0);
        let (_, scaled) = taumode(&(&x * 37.5), &lap, 0.7);
        assert!((scaled - &lam).abs().max().double_value(&[]) < 1e-5, "λ(cx) = λ(x)");
    }

    // The direct O(T²) formula, one pair at a time.
    fn tau_attention_direct(lq: &[f64], lk: &[f64], v: &[Vec<f64>], inv_temp: f64) -> Vec<Vec<f64>> {
        let (tq, tk) = (lq.len(), lk.len());
        (0..tq).map(|i| {
            let last = i + tk - tq; // the query at row i sits at key position i + (tk − tq)
            let w: Vec<f64> = (0..=last).map(|j| (-(lq[i] - lk[j]).abs() * inv_temp).exp()).collect();
            let z: f64 = w.iter().sum();
            (0..v[0].len()).map(|d| (0..=last).map(|j| w[j] / z * v[j][d]).sum()).collect()
        }).collect()
    }

    #[test]
    fn tau_attention_equals_direct_formula() {
        let (h, tk, d) = (3i64, 11i64, 5i64);
        for tq in [tk, 1, 4] {
            let lq = Tensor::rand([1, h, tq], (Kind::Double, Device::Cpu));
            let lk = Tensor::rand([1, h, tk], (Kind::Double, Device::Cpu));
            let v = Tensor::randn([1, h, tk, d], (Kind::Double, Device::Cpu));
            let it = Tensor::from_slice(&[1.0f64, 4.0, 20.0]);
            let y = tau_attention(&lq, &lk, &v, &it);
            for hh in 0..h {
                let row = |t: &Tensor| Vec::<f64>::try_from(t.get(0).get(hh)).unwrap();
                let vv: Vec<Vec<f64>> = (0..tk).map(|j| Vec::<f64>::try_from(v.get(0).get(hh).get(j)).unwrap()).collect();
                let want = tau_attention_direct(&row(&lq), &row(&lk), &vv, it.double_value(&[hh]));
                for (i, wi) in want.iter().enumerate() {
                    let got = Vec::<f64>::try_from(y.get(0).get(hh).get(i as i64)).unwrap();
                    assert!(got.iter().zip(wi).all(|(g, w)| (g - w).abs() < 1e-10), "tq={tq} head {hh} row {i}");
                }
            }
        }
    }

    #[test]
    fn chunked_tau_attention_matches_the_plain_path() {
        let opts = (Kind::Double, Device::Cpu);
        for (tq, tk, chunk, learn) in [(13, 13, 4, true), (13, 13, 13, false), (5, 13, 2, true), (1, 9, 3, true), (16, 16, 100, false)] {
            let lq = Tensor::rand([2, 3, tq], opts).set_requires_grad(true);
            let lk = Tensor::rand([2, 3, tk], opts).set_requires_grad(true);
            let v = Tensor::randn([2, 3, tk, 5], opts).set_requires_grad(true);
            let it = Tensor::from_slice(&[1.0f64, 6.0, 20.0]).set_requires_grad(learn);
            let probe = Tensor::randn([2, 3, tq, 5], opts);
            let grads = |y: Tensor| {
                (y.shallow_clone() * &probe).sum(Kind::Double).backward();
                let g: Vec<Tensor> = [&lq, &lk, &v, &it].iter().map(|t| { let g = t.grad(); if g.defined() { g.copy() } else { Tensor::zeros([1], opts) } }).collect();
                for t in [&lq, &lk, &v, &it] {
                    t.shallow_clone().zero_grad();
                }
                (y.detach(), g)
            };
            let (y0, g0) = grads(tau_attention(&lq, &lk, &v, &it));
            let (y1, g1) = grads(tau_attention_chunked(&lq, &lk, &v, &it, chunk));
            assert!((&y0 - &y1).abs().max().double_value(&[]) < 1e-12, "tq {tq} tk {tk} chunk {chunk}: forward");
            for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                assert!((a - b).abs().max().double_value(&[]) < 1e-10, "tq {tq} tk {tk} chunk {chunk}: gradient of input {i}");
            }
        }
    }

    #[test]
    fn tau_gradients_match_finite_differences() {
        let lap = chain_laplacian(4).to_kind(Kind::Double);
        let opts = (Kind::Double, Device::Cpu);
        let (q, k, v) = (Tensor::randn([1, 2, 5, 4], opts), Tensor::randn([1, 2, 5, 4], opts), Tensor::randn([1, 2, 5, 4], opts));
        let it = Tensor::from_slice(&[3.0f64, 7.0]);
        let probe = Tensor::randn([1, 2, 5, 4], opts);
        let f = |q: &Tensor, k: &Tensor, v: &Tensor, it: &Tensor| (tau_attention(&taumode(q, &lap, 0.8).1, &taumode(k, &lap, 0.8).1, v, it) * &probe).sum(Kind::Double);
        let inputs = [q.set_requires_grad(true), k.set_requires_grad(true), v.set_requires_grad(true), it.set_requires_grad(true)];
        f(&inputs[0], &inputs[1], &inputs[2], &inputs[3]).backward();
        for which in 0..4 {
            let analytic = Vec::<f64>::try_from(inputs[which].grad().flatten(0, -1)).unwrap();
            for (n, a) in analytic.iter().enumerate() {
                let at = |delta: f64| tch::no_grad(|| {
                    let xs: Vec<Tensor> = inputs.iter().map(|t| t.detach().copy()).collect();
                    let _ = xs[which].view([-1]).get(n as i64).g_add_scalar_(delta);
                    f(&xs[0], &xs[1], &xs[2], &xs[3]).double_value(&[])
                });
                let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
                assert!((numeric - a).abs() < 1e-6 * (1.0 + a.abs()), "input {which} elem {n}: analytic {a} numeric {numeric}");
            }
        }
    }

    #[test]
    fn cached_and_uncached_greedy_decoding_agree() {
        for (attn, kv) in VARIANTS {
            let m = small_kv(attn, 512, kv);
            let prompt = [5i64, 17, 300, 2, 99];
            let cached = generate(&m, &prompt, 11, 0.0, 1, 0, true).unwrap();
            assert_eq!(cached, generate(&m, &prompt, 11, 0.0, 1, 0, false).unwrap(), "{attn}");
            assert_eq!(cached.len(), 11);
            // stronger than tokens: the hidden states of a prefill + one-token steps equal one full forward
            let idx = Tensor::randint(512, [2, 12], (Kind::Int64, Device::Cpu));
            let full = tch::no_grad(|| m.hidden(&idx, None));
            let mut cache = Cache::new(m.cfg.n_layer, 12);
            let mut parts = vec![tch::no_grad(|| m.forward(&idx.narrow(1, 0, 5), Some(&mut cache), None))];
            for i in 5..12 {
                parts.push(tch::no_grad(|| m.forward(&idx.narrow(1, i, 1), Some(&mut cache), None)));
            }
            let diff = (Tensor::cat(&parts, 1) - full).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{attn}: cached forward differs by {diff}");
        }
    }

    #[test]
    fn cache_holds_k_and_v_or_lambda_and_v() {
        let (b, t) = (3i64, 7i64);
        for (attn, kv) in [("causal", 0), ("tau", 0), ("causal", 1), ("tau", 1)] {
            let m = small_kv(attn, 512, kv);
            let mut cache = Cache::new(m.cfg.n_layer, t);
            let _ = tch::no_grad(|| m.forward(&Tensor::randint(512, [b, t], (Kind::Int64, Device::Cpu)), Some(&mut cache), None));
            let (l, h, d, s) = (m.cfg.n_layer, m.cfg.kv_heads(), m.cfg.head_dim(), 4); // f32 compute on CPU; λk is f32 too
            assert_eq!(h, if kv == 1 { 1 } else { 2 });
            let want = if attn == "causal" { 2 * l * b * h * t * d * s } else { l * b * h * t * (d * s + 4) };
            assert_eq!((cache.len(), cache.bytes()), (t, want), "{attn}");
            assert_eq!(cache_bytes_formula(&m.cfg, Kind::Float, b, t), want);
            assert_eq!(cache_bytes_formula(&m.cfg, Kind::BFloat16, b, t), if attn == "causal" { want / 2 } else { l * b * h * t * (d * 2 + 4) });
        }
    }

    #[test]
    fn samples_are_reproducible_from_a_seed() {
        let m = small("tau-lt", 512);
        let draw = |seed| generate(&m, &[1, 2, 3], 12, 1.0, 50, seed, true).unwrap();
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8), "another seed, another sample (12 tokens from 50 candidates)");
    }

    #[test]
    fn checkpoint_round_trip() {
        for (attn, kv) in VARIANTS {
            let m = small_kv(attn, 512, kv);
            let p = tmp(&format!("{attn}-{kv}.safetensors"));
            save_checkpoint(&m, &p).unwrap();
            let back = load_checkpoint(&p, Device::Cpu).unwrap();
            assert_eq!(back.cfg, m.cfg);
            let idx = Tensor::randint(512, [1, 16], (Kind::Int64, Device::Cpu));
            let (a, b) = tch::no_grad(|| (m.logits(&m.hidden(&idx, None)), back.logits(&back.hidden(&idx, None))));
            assert!((a - b).abs().max().double_value(&[]) == 0.0, "{attn}: reloaded weights give the same logits");
        }
        let e = load_checkpoint(&tmp("nothing.safetensors"), Device::Cpu).err().unwrap();
        assert!(e.contains("--save-checkpoint"), "{e}");
    }
    fn max_abs(t: &Tensor) -> f64 { f64::try_from(t.abs().max()).unwrap() }

    /// Laplacian invariants: symmetric, zero row sums, PSD, off-diagonals are edge weights in [w(eps), 1].
    fn assert_graph_laplacian(l: &Tensor, f: i64) {
        assert_eq!(l.size(), [f, f]);
        assert_eq!(l.kind(), Kind::Float);
        let scale = max_abs(l);
        assert!(max_abs(&(l - l.transpose(0, 1))) == 0.0, "L must be exactly symmetric");
        assert!(max_abs(&l.sum_dim_intlist(1, false, Kind::Double)) < 1e-4 * scale, "rows must sum to 0");
        let e = eig(l);
        assert!(e[0] >= -1e-4 * e[f as usize - 1], "L must be PSD, min eig {}", e[0]);
    }

    // Zipf-like Markov source: mostly a short hop from the previous token (local structure the graph can see), else a fresh Zipf draw.
    fn zipf_markov(n: usize, vocab: usize, seed: u64) -> Vec<u16> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cdf: Vec<f64> = (1..=vocab).map(|r| (r as f64).powf(-1.1)).scan(0.0, |a, x| { *a += x; Some(*a) }).collect();
        let z = *cdf.last().unwrap();
        cdf.iter_mut().for_each(|c| *c /= z);
        let draw = |rng: &mut StdRng| { let u = rng.gen::<f64>(); cdf.partition_point(|&c| c < u).min(vocab - 1) };
        let mut prev = draw(&mut rng);
        (0..n).map(|_| {
            prev = if rng.gen_bool(0.6) { (prev + 1 + draw(&mut rng) % 8) % vocab } else { draw(&mut rng) };
            ((prev * 31 + 5) % 65536) as u16 // 31 is odd, so this scatters ids bijectively over u16
        }).collect()
    }

    fn small_cfg() -> LapConfig { LapConfig { n_tokens: 300_000, k_items: 1024, ..LapConfig::default() } }

    #[test]
    fn chain() {
        for f in [2i64, 8, 64] {
            let l = chain_laplacian(f);
            assert_graph_laplacian(&l, f);
            let want = 2.0 - 2.0 * (std::f64::consts::PI / f as f64).cos();
            assert!((eig(&l)[1] - want).abs() < 1e-4, "F={f}: λ2 {} vs {want}", eig(&l)[1]);
            let s = laplacian_stats(&l, 0.0);
            assert_eq!((s.nnz, s.deg_min, s.deg_max, s.connected, s.n_components), (3 * f - 2, 1, if f > 2 { 2 } else { 1 }, true, 1));
        }
    }

    #[test]
    fn cooc_and_ppmi_by_hand() {
        // ids 1 (×3) and 2 (×2) are the top K=2 items 0 and 1; id 3 is ignored.
        let toks = Tensor::from_slice(&[1i64, 2, 1, 3, 1, 2]);
        let c = lap_cooc(&toks, 2, 1).unwrap();
        assert!(c.equal(&Tensor::from_slice(&[0i64, 3, 3, 0]).view([2, 2])), "{c}"); // 1-2 adjacent: (0,1),(1,0),(0,1)
        let c = lap_cooc(&toks, 2, 2).unwrap();
        assert!(c.equal(&Tensor::from_slice(&[4i64, 3, 3, 0]).view([2, 2])), "{c}"); // offset 2 adds 1…1 twice
        assert!(lap_cooc(&toks, 4, 1).unwrap_err().contains("only 3 distinct tokens"));
        // c=[[0,2],[2,4]]: total 8, rows 2 and 6: pmi01 = ln(2·8/12) > 0, pmi11 = ln(4·8/36) < 0 → 0, c00 = 0 → 0.
        let p = lap_ppmi(&Tensor::from_slice(&[0.0f32, 2.0, 2.0, 4.0]).view([2, 2]));
        let x = (4.0f32 / 3.0).ln();
        assert!(max_abs(&(p - Tensor::from_slice(&[0.0f32, x, x, 0.0]).view([2, 2]))) < 1e-6);
    }

    #[test]
    fn rsvd_matches_exact_svd_on_low_rank() {
        let mut rng = StdRng::seed_from_u64(1);
        let (a, b) = (lap_gaussian(300, 8, &mut rng), lap_gaussian(8, 200, &mut rng));
        let m = a.matmul(&b);
        let us = lap_rsvd(&m, 8, &mut rng);
        let got = us.to_device(Device::Cpu).norm_scalaropt_dim(2.0, [0i64], false); // column norms of U·S are S
        let want = m.to_kind(Kind::Double).svd(true, false).1.narrow(0, 0, 8);
        assert!(max_abs(&((got - &want) / &want)) < 1e-3);
    }

    #[test]
    fn kmeans_separates_blobs() {
        let mut rng = StdRng::seed_from_u64(2);
        let centres = Tensor::from_slice(&[0.0, 0.0, 10.0, 0.0, 0.0, 10.0]).view([3, 2]);
        let x = centres.repeat_interleave_self_int(50, 0, None::<i64>) + lap_gaussian(150, 2, &mut rng).to_kind(Kind::Double) * 0.1;
        let c = lap_kmeans(&x, 3, &mut rng);
        let nearest = lap_sqdist(&c, &centres).min_dim(1, false).0; // every true centre found to within the noise
        assert!(max_abs(&nearest) < 0.1, "{nearest}");
    }

    #[test]
    fn corpus_build_synthetic() {
        let toks = zipf_markov(300_000, 4000, 7);
        let cfg = small_cfg();
        let t0 = std::time::Instant::now();
        let l = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_graph_laplacian(&l, 64);
        let off = &l - l.diagonal(0, 0, 1).diag_embed(0, 0, 1);
        let w_min = 1.0 / (1.0 + (cfg.eps / cfg.sigma).powf(cfg.p));
        let w = off.neg().masked_select(&off.ne(0.0));
        assert!(f64::try_from(w.min()).unwrap() >= w_min - 1e-6 && f64::try_from(w.max()).unwrap() <= 1.0, "edge weights outside [w(eps), 1]");
        let s = laplacian_stats(&l, ms);
        assert!(s.deg_min >= 1 && s.deg_max <= 63 && s.nnz > 64);
        assert_eq!(s.connected, s.lambda2 > LAP_CONNECTED_TOL);
        println!("synthetic: {}", s.to_json());
        let again = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
        assert!(l.equal(&again), "same seed must give the identical L");
        let other = corpus_laplacian(&toks, &LapConfig { seed: 1, ..small_cfg() }, Device::Cpu).unwrap();
        assert_graph_laplacian(&other, 64); // a different seed is a different (valid) k-means draw
    }

    #[test]
    fn corpus_build_errors() {
        let few = zipf_markov(10_000, 100, 3);
        let e = corpus_laplacian(&few, &small_cfg(), Device::Cpu).unwrap_err();
        assert!(e.contains("distinct tokens") && e.contains("lower --lap-k") && !e.contains('\n'), "{e}");
        let e = corpus_laplacian(&few[..3], &small_cfg(), Device::Cpu).unwrap_err();
        assert!(e.contains("window"), "{e}");
        let e = corpus_laplacian(&few, &LapConfig { k_items: 32, ..small_cfg() }, Device::Cpu).unwrap_err();
        assert!(e.contains("K=32 out of range"), "{e}");
        let e = corpus_laplacian(&few, &LapConfig { sigma: 0.0, k_items: 64, ..small_cfg() }, Device::Cpu).unwrap_err();
        assert!(e.contains("positive"), "{e}");
    }

    #[test]
    fn tiny_corpus_is_connected() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny");
        let dir = dir.as_path();
        let mut files: Vec<_> = std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "txt")).collect()).unwrap_or_default();
        assert!(!files.is_empty(), "the tiny corpus ships in data/tiny");
        files.sort();
        let bpe = tokenizer();
        let toks: Vec<u16> = files.iter().flat_map(|p| bpe.encode_ordinary(&std::fs::read_to_string(p).unwrap())).map(|t| u16::try_from(t).unwrap()).collect();
        let cfg = LapConfig { k_items: 2048, ..LapConfig::default() };
        let t0 = std::time::Instant::now();
        let l = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
        let s = laplacian_stats(&l, t0.elapsed().as_secs_f64() * 1e3);
        println!("tiny corpus: {} files, {} tokens, K={}: {}", files.len(), toks.len(), cfg.k_items, s.to_json());
        assert_graph_laplacian(&l, 64);
        assert!(s.connected && s.n_components == 1 && s.lambda2 > LAP_CONNECTED_TOL, "{}", s.to_json());
    }

    // Defaults at full size (10M tokens, K=4096) on CPU: `cargo test --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn default_size_cpu_timing() {
        let toks = zipf_markov(10_000_000, 20_000, 11);
        let t0 = std::time::Instant::now();
        let l = corpus_laplacian(&toks, &LapConfig::default(), Device::Cpu).unwrap();
        let s = laplacian_stats(&l, t0.elapsed().as_secs_f64() * 1e3);
        println!("default size (synthetic 10M tokens, K=4096): {}", s.to_json());
        assert_graph_laplacian(&l, 64);
    }

    #[test]
    fn npy_round_trip_and_load_errors() {
        let l = chain_laplacian(64) * 0.37;
        let p = tmp("l.npy");
        save_laplacian(&p, &l).unwrap();
        assert!(load_laplacian_file(&p, 64).unwrap().equal(&l));
        // f64 .npy and .safetensors load too (converted to f32)
        let p64 = tmp("l64.npy");
        l.to_kind(Kind::Double).write_npy(&p64).unwrap();
        assert!(load_laplacian_file(&p64, 64).unwrap().equal(&l));
        let ps = tmp("l.safetensors");
        Tensor::write_safetensors(&[("anything", &l)], &ps).unwrap();
        assert!(load_laplacian_file(&ps, 64).unwrap().equal(&l));

        let err = |p: &Path, dim: i64, want: &str| {
            let e = load_laplacian_file(p, dim).unwrap_err();
            assert!(e.contains(want) && !e.contains('\n'), "expected '{want}' in: {e}");
        };
        err(&p, 32, "shape [64, 64], need [32, 32]");
        let asym = l.copy();
        let _ = asym.get(0).get(5).fill_(1.0);
        let pa = tmp("asym.npy");
        save_laplacian(&pa, &asym).unwrap();
        err(&pa, 64, "not symmetric");
        let pn = tmp("nan.npy");
        save_laplacian(&pn, &(&l * f64::NAN)).unwrap();
        err(&pn, 64, "NaN");
        err(&tmp("missing.npy"), 64, "not found");
        let pg = tmp("garbage.npy");
        std::fs::write(&pg, b"this is not a numpy file at all").unwrap();
        err(&pg, 64, "bad magic");
        let pt = tmp("trunc.npy");
        std::fs::write(&pt, &std::fs::read(&p).unwrap()[..1000]).unwrap();
        err(&pt, 64, "truncated or corrupt");
        let pgs = tmp("garbage.safetensors");
        std::fs::write(&pgs, b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense}").unwrap();
        err(&pgs, 64, "not a valid safetensors");
        let px = tmp("l.txt");
        std::fs::write(&px, b"x").unwrap();
        err(&px, 64, "unknown extension");
        assert!(save_laplacian(&tmp("x.npy"), &Tensor::zeros([3, 4], (Kind::Float, Device::Cpu))).unwrap_err().contains("not square"));
}
}

// ----------------------------------------------------------------------------------------------------------------
// GPU tests: ignored by default. On a CUDA box (no cargo there): build them here with
// `cargo test --release --no-run`, carry target/release/deps/train_gpt-<hash>, and run it with
// `LD_LIBRARY_PATH=<torch>/lib train_gpt-<hash> --ignored --test-threads 1`.

#[cfg(test)]
mod gpu_tests {
    use super::*;

    fn cuda() -> Device {
        load_cuda_runtime();
        assert!(tch::Cuda::is_available(), "these tests need a CUDA GPU");
        Device::Cuda(0)
    }

    // The same small model (same weights) on the CPU in f32 and on the GPU in bf16.
    fn twins(attn: &str, kv: i64) -> (Model, Model) {
        let dev = cuda();
        tch::manual_seed(0);
        let cfg = ModelCfg { n_layer: 2, n_head: 4, n_kv_head: kv, n_embd: 128, seq_len: 64, vocab_size: 1024, attn: attn.into() };
        let lap = (attn != "causal").then(|| chain_laplacian(32));
        let cpu = Model::new(cfg, Device::Cpu, Kind::Float, lap, 0.8, 0.5, 20.0);
        tch::no_grad(|| {
            for (_, c) in &cpu.params {
                let w = c + c.randn_like() * 0.02; // zero-initialised projections would hide the attention
                c.shallow_clone().copy_(&w);
            }
        });
        let gpu = like(&cpu, dev, Kind::BFloat16);
        (cpu, gpu)
    }

    // A model with m's config, weights, τ and temperatures, on another device or in another compute dtype.
    fn like(m: &Model, dev: Device, cdt: Kind) -> Model {
        let mut o = Model::new(m.cfg.clone(), dev, cdt, m.cfg.is_tau().then(|| m.lap.copy()), m.tau, 1.0, 1.0);
        tch::no_grad(|| {
            o.params.iter_mut().zip(&m.params).for_each(|((_, a), (_, b))| { a.copy_(b); });
            o.inv_temp.copy_(&m.inv_temp);
        });
        o
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to(Device::Cpu).to_kind(Kind::Double), b.to(Device::Cpu).to_kind(Kind::Double));
        (&a - &b).abs().max().double_value(&[]) / (a.abs().max().double_value(&[]) + 1e-12)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn bf16_gpu_loss_and_gradients_match_f32_cpu() {
        for (attn, kv) in [("causal", 0), ("tau", 0), ("tau-lt", 0), ("causal", 2), ("tau", 2)] {
            let (c, g) = twins(attn, kv);
            // the same model in bf16 on the CPU: how far bf16 itself takes each gradient from fp32
            let c16 = like(&c, Device::Cpu, Kind::BFloat16);
            let (x, y) = (Tensor::randint(1024, [4, 64], (Kind::Int64, Device::Cpu)), Tensor::randint(1024, [4, 64], (Kind::Int64, Device::Cpu)));
            let lc = c.loss_backward(&x, &y, 0, 1.0).double_value(&[]);
            let _ = c16.loss_backward(&x, &y, 0, 1.0);
            let lg = g.loss_backward(&x.to(g.lap.device()), &y.to(g.lap.device()), 0, 1.0).double_value(&[]);
            assert!((lc - lg).abs() < 2e-2 * lc, "{attn}/{kv}: loss {lc} vs {lg}");
            // tau's |λq − λk| is not smooth: at inverse temperature 20 (tau-lt), bf16 rounding of q and k flips the sign of
            // near ties, so its gradients legitimately move far (0.07–0.16 for qkv, by the draw). The GPU may be twice as far
            // from fp32 as bf16 on the CPU is, and 5% in any case.
            for (((n, pc), (_, pg)), (_, ph)) in c.params.iter().zip(&g.params).zip(&c16.params) {
                let (gpu, cpu16) = (rel(&pc.grad(), &pg.grad()), rel(&pc.grad(), &ph.grad()));
                assert!(gpu < (2.0 * cpu16).max(5e-2), "{attn}/{kv}: {n} grad differs by {gpu} (bf16 on the CPU by {cpu16})");
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn chunked_head_matches_autograd_on_gpu() {
        let (_, mut g) = twins("causal", 0);
        let dev = g.lap.device();
        let (x, y) = (Tensor::randint(1024, [4, 64], (Kind::Int64, dev)), Tensor::randint(1024, [4, 64], (Kind::Int64, dev)));
        let (l0, g0) = g.loss_and_grads(&x, &y, 0, 0);
        for chunk in [100, 256] {
            let (l1, g1) = g.loss_and_grads(&x, &y, 0, chunk);
            assert!((l0 - l1).abs() < 1e-3 * l0, "chunk {chunk}: {l0} vs {l1}");
            for (a, b) in g0.iter().zip(&g1) {
                assert!(rel(a, b) < 2e-2, "chunk {chunk}: {}", rel(a, b));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn decoding_cache_matches_full_forward_on_gpu() {
        use Kernels::{Fused, Plain};
        for (attn, kv, kernels) in [("causal", 0, Plain), ("tau", 0, Plain), ("causal", 1, Plain), ("tau", 1, Plain), ("tau", 0, Fused), ("tau", 1, Fused)] {
            let (_, mut g) = twins(attn, kv);
            g.kernels = kernels; // fused: queries after a cached prefix (Tq < Tk) over views of the cache
            let idx = Tensor::randint(1024, [2, 40], (Kind::Int64, g.lap.device()));
            let full = tch::no_grad(|| g.hidden(&idx, None));
            let mut cache = Cache::new(g.cfg.n_layer, 40);
            let mut parts = vec![tch::no_grad(|| g.forward(&idx.narrow(1, 0, 30), Some(&mut cache), None))];
            for i in 30..40 {
                parts.push(tch::no_grad(|| g.forward(&idx.narrow(1, i, 1), Some(&mut cache), None)));
            }
            assert!(rel(&full, &Tensor::cat(&parts, 1)) < 2e-2, "{attn}/{kv}");
            assert_eq!(cache.bytes(), cache_bytes_formula(&g.cfg, Kind::BFloat16, 2, 40));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tau_attention_on_gpu_equals_cpu() {
        let dev = cuda();
        let (lq, lk) = (Tensor::rand([2, 3, 100], (Kind::Float, Device::Cpu)), Tensor::rand([2, 3, 100], (Kind::Float, Device::Cpu)));
        let (v, it) = (Tensor::randn([2, 3, 100, 16], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[1.0f32, 5.0, 20.0]));
        let (a, b) = (tau_attention(&lq, &lk, &v, &it), tau_attention(&lq.to(dev), &lk.to(dev), &v.to(dev), &it.to(dev)));
        assert!(rel(&a, &b) < 1e-5);
    }

    // The output and the gradients (λq, λk, V, inv_temp) of one tau attention for the loss Σ output·probe.
    fn attention_and_grads(f: fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor, lq: &Tensor, lk: &Tensor, v: &Tensor, it: &Tensor, probe: &Tensor) -> Vec<Tensor> {
        let x: Vec<Tensor> = [lq, lk, v, it].iter().map(|t| t.detach().copy().set_requires_grad(true)).collect();
        let y = f(&x[0], &x[1], &x[2], &x[3]);
        (y.to_kind(Kind::Float) * probe).sum(Kind::Float).backward();
        std::iter::once(y.detach()).chain(x.iter().map(Tensor::grad)).collect()
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_tau_attention_matches_the_plain_path() {
        let dev = cuda();
        let f32 = (Kind::Float, dev);
        let names = ["output", "dλq", "dλk", "dV", "dinv_temp"];
        // (B, H, Tq, Tk, D): one tile; ragged tiles; decoding after a prefix (Tq < Tk); D 32 and 128; a speedrun layer
        for (n, (b, h, tq, tk, d)) in [(2, 3, 64, 64, 64), (1, 2, 1000, 1000, 64), (2, 2, 77, 77, 64), (2, 3, 1, 300, 64), (1, 1, 5, 300, 64),
                                  (2, 2, 130, 130, 32), (1, 2, 200, 200, 128), (4, 6, 1024, 1024, 64)].into_iter().enumerate() {
            let shape = format!("B {b} H {h} Tq {tq} Tk {tk} D {d}");
            let (lq, lk) = (Tensor::rand([b, h, tq], f32), Tensor::rand([b, h, tk], f32));
            let it = Tensor::from_slice(&[1.0f32, 20.0, 5.0, 60.0, 2.0, 10.0][..h as usize]).to(dev);
            let (v, probe) = (Tensor::randn([b, h, tk, d], f32), Tensor::randn([b, h, tq, d], f32));
            let plain = attention_and_grads(tau_attention, &lq, &lk, &v, &it, &probe);
            let fused = attention_and_grads(tau_attention_fused, &lq, &lk, &v, &it, &probe);
            for (name, (p, f)) in names.iter().zip(plain.iter().zip(&fused)) {
                assert!(rel(p, f) < 1e-4, "fp32, {shape}: {name} differs by {}", rel(p, f));
            }
            // bf16 V: both paths against fp32 arithmetic on the same rounded inputs; the fused one is no worse than bf16 allows.
            // Every other shape, V is a [B,H,T,D] view of [B,T,H,D] memory, as the model's is.
            let vb = v.to_kind(Kind::BFloat16);
            let vb = if n % 2 == 1 { vb.transpose(1, 2).contiguous().transpose(1, 2) } else { vb };
            let pb = probe.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            let exact = attention_and_grads(tau_attention, &lq, &lk, &vb.to_kind(Kind::Float), &it, &pb);
            let plain = attention_and_grads(tau_attention, &lq, &lk, &vb, &it, &pb);
            let fused = attention_and_grads(tau_attention_fused, &lq, &lk, &vb, &it, &pb);
            for (name, ((e, p), f)) in names.iter().zip(exact.iter().zip(&plain).zip(&fused)) {
                let (ep, ef) = (rel(e, p), rel(e, f));
                assert!(ef < (2.0 * ep).max(1e-2), "bf16, {shape}: {name} off by {ef} (the plain path by {ep})");
            }
        }
    }

    // A bare head [V, 128] on the GPU with weights × 50: logits of σ ≈ 11 for unit hidden states, so that the soft cap's
    // slope (1 − t²) is far from 1 and must be right.
    fn big_head(v: i64, cdt: Kind) -> Model {
        let cfg = ModelCfg { n_layer: 1, n_head: 2, n_kv_head: 0, n_embd: 128, seq_len: 8, vocab_size: v, attn: "causal".into() };
        let mut m = Model::new(cfg, cuda(), cdt, None, 1.0, 1.0, 1.0);
        tch::no_grad(|| { let w = &mut m.params[0].1; let big = &*w * 50.0; w.copy_(&big) });
        m
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_head_matches_the_plain_chunked_head() {
        // V: a multiple of the 16-byte vector, and two rows that start off it (bf16 and fp32); N: one row, a few, and
        // 300 = two chunks of 128 and a ragged one
        for v in [1000, 50304, 50257] {
            for (cdt, grad_tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
                let mut m = big_head(v, cdt);
                let dev = m.lap.device();
                for n in [1, 7, 300] {
                    let shape = format!("V {v} N {n} {cdt:?}");
                    let h = Tensor::randn([n, 128], (cdt, dev));
                    let y = Tensor::randint(v, [n], (Kind::Int64, dev));
                    let _ = y.get(n - 1).fill_(v - 1); // the last column: a row's scalar tail
                    let _ = y.get(0).fill_(0);
                    let mut head = |kernels: Kernels, grad: bool| {
                        m.kernels = kernels;
                        m.head_chunked(&h, &y, 128, grad)
                    };
                    let (l0, g0) = head(Kernels::Plain, true);
                    let (l1, g1) = head(Kernels::Fused, true);
                    let (l2, _) = head(Kernels::Fused, false);
                    let (l0, l1, l2) = (l0.double_value(&[]), l1.double_value(&[]), l2.double_value(&[]));
                    // the same logits (one matmul) in both paths and fp32 arithmetic after it: the loss agrees to fp32 rounding
                    assert!((l0 - l1).abs() < 1e-5 * l0 && l1 == l2, "{shape}: loss {l0} (plain) vs {l1} (fused) and {l2} (fused, no gradient)");
                    let ((dh0, dw0), (dh1, dw1)) = (g0.unwrap(), g1.unwrap());
                    for (name, a, b) in [("dh", &dh0, &dh1), ("dwte", &dw0, &dw1)] {
                        assert!(rel(a, b) < grad_tol, "{shape}: {name} differs by {}", rel(a, b));
                    }
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_cross_entropy_scales_its_gradient_and_marks_bad_targets() {
        let dev = cuda();
        for kind in [Kind::Float, Kind::BFloat16] {
            let z = (Tensor::randn([5, 1003], (Kind::Float, dev)) * 20.0).to_kind(kind);
            let y = Tensor::from_slice(&[0i64, 1002, -1, 1003, 7]).to(dev); // rows 2 and 3: outside [0, V)
            let bad = Tensor::from_slice(&[false, false, true, true, false]).to(dev);
            let good = Tensor::from_slice(&[0i64, 1, 4]).to(dev);
            let (mut g1, mut g2, mut kept) = (z.copy(), z.copy(), z.copy());
            let (l1, l2, l0) = (softcap_ce_fused(&mut g1, &y, 1.0, true), softcap_ce_fused(&mut g2, &y, 0.5, true), softcap_ce_fused(&mut kept, &y, 1.0, false));
            assert!(l1.isnan().equal(&bad) && g1.isnan().all_dim(1, false).equal(&bad), "{kind:?}: NaN rows");
            assert!(l1.index_select(0, &good).equal(&l2.index_select(0, &good)) && l1.index_select(0, &good).equal(&l0.index_select(0, &good)), "{kind:?}: losses");
            // × 0.5 is exact, before and after rounding to bf16
            assert!((g1.index_select(0, &good) * 0.5).equal(&g2.index_select(0, &good)), "{kind:?}: scale");
            assert!(kept.equal(&z), "{kind:?}: without the gradient z stays");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_model_with_fused_kernels_is_the_same_model_on_gpu() {
        // causal: the block kernels and the head; tau: attention too
        for (attn, kv) in [("causal", 0), ("tau", 0), ("tau-lt", 0), ("tau", 2)] {
            let (_, mut g) = twins(attn, kv);
            let dev = g.lap.device();
            let (x, y) = (Tensor::randint(1024, [3, 50], (Kind::Int64, dev)), Tensor::randint(1024, [3, 50], (Kind::Int64, dev))); // 50: a ragged tile
            g.cdt = Kind::Float;
            g.kernels = Kernels::Plain;
            let (lt, gt) = g.loss_and_grads(&x, &y, 0, 0); // fp32 through the plain path: the truth for bf16's bounds
            for cdt in [Kind::Float, Kind::BFloat16] {
                g.cdt = cdt;
                g.kernels = Kernels::Plain;
                let (l0, g0) = g.loss_and_grads(&x, &y, 0, 0);
                g.kernels = Kernels::Fused;
                // head_chunk 0: all 150 rows in one kernel call; 64: two chunks and a ragged one
                for head_chunk in [0, 64] {
                    let (l1, g1) = g.loss_and_grads(&x, &y, 0, head_chunk);
                    let what = format!("{attn}/{kv} {cdt:?} head chunk {head_chunk}");
                    if cdt == Kind::Float {
                        // fp32: the same numbers up to rounding
                        assert!((l0 - l1).abs() < 1e-5 * l0, "{what}: loss {l0} vs {l1}");
                        for ((n, _), (a, b)) in g.params.iter().zip(g0.iter().zip(&g1)) {
                            assert!(rel(a, b) < 1e-3, "{what}: {n} grad differs by {}", rel(a, b));
                        }
                    } else {
                        // bf16: the fused kernels round once where the plain ops round at every step, so they are held to
                        // fp32 as the plain path is: at most twice its distance (tau's non-smooth |λq − λk| makes that
                        // distance large for qkv; see bf16_gpu_loss_and_gradients_match_f32_cpu), and 2e-3 / 5% in any case
                        assert!((l1 - lt).abs() < (2.0 * (l0 - lt).abs()).max(2e-3 * lt), "{what}: loss {l1}, plain {l0}, fp32 {lt}");
                        for ((((n, _), t), a), b) in g.params.iter().zip(&gt).zip(&g0).zip(&g1) {
                            let (plain, fused) = (rel(t, a), rel(t, b));
                            assert!(fused < (2.0 * plain).max(5e-2), "{what}: {n} grad {fused} from fp32 (plain bf16: {plain})");
                        }
                    }
                }
            }
        }
    }

    // Forward and input gradient (through a random probe) of a fused op and its plain twin, as max-relative differences.
    fn op_diff(x: &Tensor, fused: impl Fn(&Tensor) -> Vec<Tensor>, plain: impl Fn(&Tensor) -> Vec<Tensor>) -> (f64, f64) {
        let run = |f: &dyn Fn(&Tensor) -> Vec<Tensor>| {
            let xi = x.detach().set_requires_grad(true);
            let ys = f(&xi);
            tch::manual_seed(7); // the same probes for both, drawn in logical order (randn_like would follow the strides)
            let loss = ys.iter().map(|y| (y.to_kind(Kind::Float) * Tensor::randn(y.size(), (Kind::Float, y.device()))).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, x.device())), |a, b| a + b);
            loss.backward();
            (ys.iter().map(|y| y.to_kind(Kind::Float).flatten(0, -1)).collect::<Vec<_>>(), xi.grad())
        };
        let ((y0, g0), (y1, g1)) = (run(&plain), run(&fused));
        (rel(&Tensor::cat(&y0, 0), &Tensor::cat(&y1, 0)), rel(&g0, &g1))
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn block_kernels_match_the_plain_ops() {
        let dev = cuda();
        // fp32 to fp32 agrees to rounding; bf16 outputs (and bf16 inputs) to bf16's
        for (xk, yk, tol) in [(Kind::Float, Kind::Float, 1e-5), (Kind::Float, Kind::BFloat16, 1e-2), (Kind::BFloat16, Kind::BFloat16, 2e-2)] {
            for shape in [vec![3, 50, 384], vec![7, 130], vec![1, 1, 32]] {
                let x = Tensor::randn(shape.as_slice(), (xk, dev)) * 3.0;
                let (dy, dg) = op_diff(&x, |x| vec![rmsnorm_fused(x, yk)], |x| vec![rms(x).to_kind(yk)]);
                assert!(dy < tol && dg < tol, "rmsnorm {xk:?}→{yk:?} {shape:?}: forward {dy}, gradient {dg}");
                let (dy, dg) = op_diff(&x.to_kind(yk), |u| vec![relu2_fused(u)], |u| vec![u.relu().square()]);
                assert!(dy < tol && dg < tol, "relu² {yk:?} {shape:?}: forward {dy}, gradient {dg}");
                // one element in: off the 16-byte vectors, the kernel's scalar path
                let u = x.to_kind(yk).flatten(0, -1);
                let u = u.narrow(0, 1, u.size()[0] - 1);
                let (dy, dg) = op_diff(&u, |u| vec![relu2_fused(u)], |u| vec![u.relu().square()]);
                assert!(dy < tol && dg < tol, "relu² {yk:?} {shape:?} from element 1: forward {dy}, gradient {dg}");
            }
        }
        // add + RMSNorm against x + y and rms: both outputs and both inputs' gradients, with the stream's own gradient
        // (s used later) and without it (only h used, as after the last layer)
        for (yk, hk, tol) in [(Kind::Float, Kind::Float, 1e-5), (Kind::BFloat16, Kind::BFloat16, 2e-2), (Kind::BFloat16, Kind::Float, 1e-2)] {
            for (shape, use_s) in [(vec![3, 50, 384], true), (vec![7, 130], false)] {
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, dev)) * 3.0;
                let y = Tensor::randn(shape.as_slice(), (Kind::Float, dev)).to_kind(yk);
                let run = |fused: bool| {
                    let (xi, yi) = (x.detach().set_requires_grad(true), y.detach().set_requires_grad(true));
                    let (s, h) = if fused { add_rmsnorm_fused(&xi, &yi, hk) } else { let s = &xi + &yi; let h = rms(&s).to_kind(hk); (s, h) };
                    tch::manual_seed(7);
                    let probe = |z: &Tensor| (z.to_kind(Kind::Float) * Tensor::randn(z.size(), (Kind::Float, dev))).sum(Kind::Float);
                    let loss = if use_s { probe(&h) + probe(&s) } else { probe(&h) };
                    loss.backward();
                    [s.detach(), h.to_kind(Kind::Float), xi.grad(), yi.grad().to_kind(Kind::Float)]
                };
                let (plain, fused) = (run(false), run(true));
                for (name, (p, f)) in ["s", "h", "dx", "dy"].iter().zip(plain.iter().zip(&fused)) {
                    assert!(rel(p, f) < tol, "add+rmsnorm y {yk:?} h {hk:?} {shape:?} (s used: {use_s}): {name} differs by {}", rel(p, f));
                }
            }
        }
        // taumode's λ (and E) against the plain ops (fp32 products of the same bf16 x): heads of 32, 64 and 128, x a transposed
        // view as q and k are, an L that is not symmetric (the backward takes L + Lᵀ); 3·50·4 rows, not a multiple of 16
        // E and λ hold to 1e-4; the gradient is bf16 in both, so an ulp (2⁻⁸ relative) apart at most
        for d in [32, 64, 128] {
            let a = Tensor::randn([d, d], (Kind::Float, dev));
            let lap = a.matmul(&a.tr()) / d as f64 + Tensor::randn([d, d], (Kind::Float, dev)) * 0.05;
            let x = Tensor::randn([3, 50, 4, d], (Kind::BFloat16, dev)).transpose(1, 2);
            let (e0, _) = tch::no_grad(|| taumode(&x, &lap, 0.8));
            let (e1, _) = tch::no_grad(|| taumode_fused(&x, &lap, 0.8));
            let (dy, dg) = op_diff(&x, |x| vec![taumode_fused(x, &lap, 0.8).1], |x| vec![taumode(x, &lap, 0.8).1]);
            assert!(rel(&e0, &e1) < 1e-4 && dy < 1e-4 && dg < 1e-2, "taumode D {d}: E {}, λ {dy}, gradient {dg}", rel(&e0, &e1));
        }
        // RoPE + QK-norm against the plain path: heads of 32, 64, 96 (a lane's second pair on half the lanes) and 128,
        // grouped keys, positions after a prefix, T = 50 (B·T not a multiple of a block's rows)
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] {
            for (h, g, d, pos) in [(4, 4, 32, 0), (6, 2, 64, 0), (2, 1, 64, 7), (2, 2, 96, 3), (2, 1, 128, 0)] {
                let (cos, sin) = rope_tables(d, 64, dev);
                let y = Tensor::randn([3, 50, (h + 2 * g) * d], (kind, dev));
                let plain = |y: &Tensor| {
                    let (q, k, v) = rope_norm(y, &cos, &sin, h, g, pos);
                    vec![q, k, v]
                };
                let fused = |y: &Tensor| {
                    let (q, k, v) = rope_norm_fused(y, &cos, &sin, h, g, pos);
                    vec![q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)]
                };
                let (dy, dg) = op_diff(&y, fused, plain);
                assert!(dy < tol && dg < tol, "rope+qk-norm {kind:?} H {h} G {g} D {d} pos {pos}: forward {dy}, gradient {dg}");
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn readback_returns_the_value_with_work_queued_behind_it() {
        let dev = cuda();
        let x = Tensor::randn([4096, 4096], (Kind::Float, dev));
        let v = x.sum(Kind::Float);
        let rb = Readback::start(&v);
        let _ = x.matmul(&x).matmul(&x); // queued after the copy
        let want = v.double_value(&[]);
        assert_eq!(rb.wait(), want);
        drop(Readback::start(&v)); // dropped unread: waits for its copy, frees its pinned buffer
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn chunked_tau_attention_matches_plain_on_gpu() {
        let dev = cuda();
        let (lq, lk) = (Tensor::rand([4, 6, 1024], (Kind::Float, dev)).set_requires_grad(true), Tensor::rand([4, 6, 1024], (Kind::Float, dev)).set_requires_grad(true));
        let v = Tensor::randn([4, 6, 1024, 64], (Kind::BFloat16, dev)).set_requires_grad(true);
        let it = Tensor::full([6], 20.0, (Kind::Float, dev)).set_requires_grad(true);
        let probe = Tensor::randn([4, 6, 1024, 64], (Kind::BFloat16, dev));
        let run = |chunk: i64| {
            let y = if chunk > 0 { tau_attention_chunked(&lq, &lk, &v, &it, chunk) } else { tau_attention(&lq, &lk, &v, &it) };
            (y.to_kind(Kind::Float) * probe.to_kind(Kind::Float)).sum(Kind::Float).backward();
            let g: Vec<Tensor> = [&lq, &lk, &v, &it].iter().map(|t| t.grad().copy()).collect();
            [&lq, &lk, &v, &it].iter().for_each(|t| t.shallow_clone().zero_grad());
            (y.detach(), g)
        };
        let (y0, g0) = run(0);
        let (y1, g1) = run(128);
        assert!(rel(&y0, &y1) < 1e-2);
        for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
            assert!(rel(a, b) < 2e-2, "gradient {i}: {}", rel(a, b));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn corpus_laplacian_is_the_same_on_gpu_and_cpu() {
        let dev = cuda();
        let toks: Vec<u16> = fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny")).unwrap()
            .filter_map(|e| e.ok().map(|e| e.path())).flat_map(|p| tokenizer().encode_ordinary(&fs::read_to_string(p).unwrap()))
            .map(|t| t as u16).collect();
        let cfg = LapConfig { k_items: 1024, ..LapConfig::default() };
        let (c, g) = (corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap(), corpus_laplacian(&toks, &cfg, dev).unwrap());
        assert!(rel(&c, &g) < 1e-3, "the build must not depend on the device: {}", rel(&c, &g));
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn memory_peaks_see_an_allocation() {
        let dev = cuda();
        reset_memory_peaks(dev);
        let t = Tensor::zeros([256, 1024, 1024], (Kind::Float, dev)); // 1 GiB
        let (alloc, reserved) = memory_peaks(dev).unwrap();
        assert!(alloc >= 1024.0 && reserved >= alloc, "{alloc} {reserved}");
        drop(t);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn decode_cache_allocation_matches_the_formula() {
        for (attn, kv) in [("causal", 0), ("tau", 0), ("tau", 2)] {
            let (_, g) = twins(attn, kv);
            let prompt = Tensor::randint(1024, [3, 10], (Kind::Int64, g.lap.device()));
            let (_, steps, bytes, allocated) = decode_timed(&g, &prompt, 20);
            assert_eq!(steps.len(), 20);
            let formula = cache_bytes_formula(&g.cfg, g.cdt, 3, 30);
            assert_eq!(bytes, formula, "{attn}/{kv}");
            // the caching allocator rounds each block up to 512 bytes: two buffers a layer
            let slack = 512 * 2 * g.cfg.n_layer;
            assert!(allocated.is_some_and(|a| a >= formula && a < formula + slack), "{attn}/{kv}: {allocated:?} vs {formula}");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn nccl_group_of_one_reduces() {
        let dev = cuda();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() as i64;
        let d = Dist::init(&DistEnv { rank: 0, world: 1, local_rank: 0, addr: "127.0.0.1".into(), port }, 30.0, true).unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0]).to(dev);
        d.all_reduce(std::slice::from_ref(&t), true).unwrap();
        d.all_reduce(std::slice::from_ref(&t), false).unwrap();
        d.sync().unwrap();
        assert_eq!(Vec::<f32>::try_from(t.to(Device::Cpu)).unwrap(), vec![1.5, -2.0]);
    }
}
