//! Weights of a model: the safetensors of a Hugging Face directory (one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`,
//! memory-mapped, read as bf16, f16 or f32) or a GGUF file (see
//! [`crate::gguf`]: quantized tensors kept as their stored blocks by
//! default, see [`QuantizedWeights`]), checked against the shape the model
//! expects.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{EngineError, Result};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// Blocks of a quantized GGML type as a GGUF file stores them (rows
    /// are whole blocks), and how the CPU backend multiplies by them.
    Ggml(crate::gguf::GgmlType, BlockArithmetic),
}

/// How the CPU backend computes `x · Wᵀ` on quantized blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockArithmetic {
    /// f32 activations, every quantized type: fused dequantize-and-dot
    /// kernels for one to four activation rows, panels of rows dequantized
    /// with the GGUF reference arithmetic through `gemm` from five; equal
    /// to weights dequantized at load to float rounding.
    F32,
    /// Activations rounded to 8 bits per 32-element block and integer
    /// block sums, as llama.cpp does (Q4_0, Q4_1, Q8_0 only).
    Q8,
}

/// How a GGUF file's quantized tensors reach the backend.
///
/// The default keeps them as stored (a Q4_1 model stays at 4.5 bits a
/// weight) with exact f32 arithmetic. Rounding activations to 8 bits as
/// llama.cpp does ([`BlocksQ8`](Self::BlocksQ8)) is faster but changes
/// SmolLM2-135M's greedy answers after 5 tokens (its chat answer to
/// "capital of France" is no longer Paris), so it is opt-in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantizedWeights {
    /// As stored blocks, every quantized type, multiplied in f32
    /// ([`BlockArithmetic::F32`]): the numbers of
    /// [`Dequantize`](Self::Dequantize) at the memory of the file.
    #[default]
    Blocks,
    /// Q4_0, Q4_1 and Q8_0 as stored blocks with 8-bit activations
    /// ([`BlockArithmetic::Q8`]); other types as [`Blocks`](Self::Blocks).
    BlocksQ8,
    /// Dequantized to f32 at load: four to seven times the memory.
    Dequantize,
}

impl QuantizedWeights {
    /// From `WEIR_GGUF_WEIGHTS`: `q8` is [`BlocksQ8`](Self::BlocksQ8),
    /// `f32` is [`Dequantize`](Self::Dequantize), anything else (or unset)
    /// [`Blocks`](Self::Blocks).
    pub fn from_env() -> Self {
        match std::env::var("WEIR_GGUF_WEIGHTS").as_deref() {
            Ok("q8") => Self::BlocksQ8,
            Ok("f32") => Self::Dequantize,
            _ => Self::Blocks,
        }
    }
}

/// The quantized types with 8-bit activation kernels
/// ([`QuantizedWeights::BlocksQ8`]).
pub const BLOCK_TYPES: [crate::gguf::GgmlType; 3] = [
    crate::gguf::GgmlType::Q4_0,
    crate::gguf::GgmlType::Q4_1,
    crate::gguf::GgmlType::Q8_0,
];

/// A tensor as stored: type, shape and little-endian bytes.
#[derive(Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: WeightDtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Raw little-endian data (owned when dequantized from GGUF).
    pub data: Cow<'a, [u8]>,
}

impl TensorView<'_> {
    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            WeightDtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WeightDtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            WeightDtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            WeightDtype::Ggml(ty, _) => {
                let mut out = vec![0f32; self.shape.iter().product()];
                crate::gguf::dequant::dequantize(ty, &self.data, &mut out);
                out
            }
        }
    }
}

/// Every weight file of a model, memory-mapped.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
    /// Set when the weights are a GGUF file (then `files` is empty).
    gguf: Option<crate::gguf::GgufWeights>,
    quantized: QuantizedWeights,
}

impl Weights {
    /// Opens `dir/model.safetensors`, or the shards that
    /// `dir/model.safetensors.index.json` lists; when `dir` is a file, it
    /// is opened as GGUF.
    pub fn open(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            let file = crate::gguf::GgufFile::open(dir)?;
            let config = crate::config::ModelConfig::from_gguf(&file)?;
            return Ok(Self::from_gguf(crate::gguf::GgufWeights::new(
                file,
                config.architecture,
                config.num_heads,
                config.num_kv_heads,
            )));
        }
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.exists() {
            shard_names(&index_path)?
        } else if single.exists() {
            vec!["model.safetensors".to_owned()]
        } else {
            return Err(EngineError::Weights {
                path: dir.to_path_buf(),
                tensor: "*".into(),
                message: "neither model.safetensors nor model.safetensors.index.json found".into(),
            });
        };
        Self::open_files(dir, names)
    }

    fn open_files(dir: &Path, names: Vec<String>) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only; the engine requires that weight
            // files are not modified while a model is loaded from them.
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| EngineError::Weights {
                path: path.clone(),
                tensor: "*".into(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
            for tensor_name in tensors.names() {
                index.insert(tensor_name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            gguf: None,
            quantized: QuantizedWeights::from_env(),
        })
    }

    /// Weights served from a GGUF file.
    pub fn from_gguf(gguf: crate::gguf::GgufWeights) -> Self {
        Self {
            dir: gguf.file().path().to_path_buf(),
            files: Vec::new(),
            index: HashMap::new(),
            gguf: Some(gguf),
            quantized: QuantizedWeights::from_env(),
        }
    }

    /// Chooses how GGUF quantized tensors are served (by default from
    /// [`QuantizedWeights::from_env`]); safetensors are unaffected.
    pub fn with_quantized(mut self, quantized: QuantizedWeights) -> Self {
        self.quantized = quantized;
        self
    }

    /// Opens one safetensors file (not a model directory).
    pub fn open_file(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::open_files(&dir, vec![name])
    }

    /// The tensor `name`, whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<TensorView<'_>> {
        self.view(name, None)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        if let Some(gguf) = &self.gguf {
            return gguf.contains(name);
        }
        self.index.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorView<'_>> {
        self.view(name, Some(shape))
    }

    fn view(&self, name: &str, shape: Option<&[usize]>) -> Result<TensorView<'_>> {
        if let Some(gguf) = &self.gguf {
            return self.gguf_view(gguf, name, shape);
        }
        let err = |message: String| EngineError::Weights {
            path: self.dir.clone(),
            tensor: name.to_owned(),
            message,
        };
        let file = *self.index.get(name).ok_or_else(|| err("missing".into()))?;
        let (path, map) = &self.files[file];
        let tensors = SafeTensors::deserialize(map).map_err(|e| EngineError::Weights {
            path: path.clone(),
            tensor: name.to_owned(),
            message: e.to_string(),
        })?;
        let view = tensors.tensor(name).map_err(|e| err(e.to_string()))?;
        let dtype = match view.dtype() {
            Dtype::BF16 => WeightDtype::BF16,
            Dtype::F16 => WeightDtype::F16,
            Dtype::F32 => WeightDtype::F32,
            other => {
                return Err(err(format!(
                    "dtype {other:?} is not supported (bf16, f16, f32)"
                )));
            }
        };
        if let Some(shape) = shape
            && view.shape() != shape
        {
            return Err(err(format!("shape {:?}, expected {shape:?}", view.shape())));
        }
        Ok(TensorView {
            dtype,
            shape: view.shape().to_vec(),
            data: Cow::Borrowed(view.data()),
        })
    }
}

impl Weights {
    fn gguf_view<'a>(
        &self,
        gguf: &'a crate::gguf::GgufWeights,
        name: &str,
        shape: Option<&[usize]>,
    ) -> Result<TensorView<'a>> {
        use crate::gguf::GgmlType;
        let (ty, shape, data) = gguf.tensor_raw(name, shape)?;
        let dtype = match ty {
            GgmlType::F32 => WeightDtype::F32,
            GgmlType::F16 => WeightDtype::F16,
            GgmlType::BF16 => WeightDtype::BF16,
            ty if self.quantized == QuantizedWeights::BlocksQ8 && BLOCK_TYPES.contains(&ty) => {
                WeightDtype::Ggml(ty, BlockArithmetic::Q8)
            }
            ty if self.quantized != QuantizedWeights::Dequantize => {
                WeightDtype::Ggml(ty, BlockArithmetic::F32)
            }
            ty => {
                let mut values = vec![0f32; shape.iter().product()];
                crate::gguf::dequant::dequantize(ty, &data, &mut values);
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                return Ok(TensorView {
                    dtype: WeightDtype::F32,
                    shape,
                    data: Cow::Owned(data),
                });
            }
        };
        Ok(TensorView { dtype, shape, data })
    }
}

fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|source| EngineError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let err = |message: String| EngineError::Config {
        path: index_path.to_path_buf(),
        field: "weight_map".into(),
        message,
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("missing or not an object".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(format!("`{tensor}` does not name a file")))?;
        if file.contains('/') || file.contains("..") {
            return Err(err(format!(
                "shard `{file}` is outside the model directory"
            )));
        }
        names.insert(file.to_owned());
    }
    Ok(names.into_iter().collect())
}
