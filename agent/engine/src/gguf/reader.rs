//! The GGUF container (versions 2 and 3): header, metadata key/values and
//! tensor directory, parsed from a memory map; tensor data stays in the map
//! as stored (quantized blocks included) until someone asks for it.
//!
//! Every length and offset is checked against the file before use, so a
//! truncated or corrupt file is an error naming the file and what is wrong,
//! never a panic or a huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::GgmlType;
use crate::error::{EngineError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// UTF-8 text.
    String(String),
    /// An array (of one element type).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer (non-negative integers of any type).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::Uint(v) => Some(v),
            Self::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float (numbers of any type).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::Float(v) => Some(v),
            Self::Uint(v) => Some(v as f64),
            Self::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type as stored.
    pub ty: GgmlType,
    /// Dimensions as GGUF lists them: innermost (contiguous) first.
    pub dims: Vec<usize>,
    /// Byte range of the data inside the file.
    pub start: usize,
    /// Bytes of data.
    pub len: usize,
}

impl TensorInfo {
    /// The shape outermost first (the safetensors / PyTorch order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    metadata: HashMap<String, MetaValue>,
    tensors: HashMap<String, TensorInfo>,
}

/// A cursor over the header that turns running out of bytes into an error.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| {
            format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.at,
                self.data.len()
            )
        })?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// A count of items each at least `min_item` bytes long, checked
    /// against what is left of the file.
    fn count(&mut self, min_item: usize, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let left = (self.data.len() - self.at) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(format!(
                "truncated or corrupt: {what} is {n}, but only {left} bytes are left"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str) -> std::result::Result<MetaValue, String> {
        let b = |c: &mut Self, n| c.take(n, what);
        Ok(match ty {
            0 => MetaValue::Uint(u64::from(b(self, 1)?[0])),
            1 => MetaValue::Int(i64::from(b(self, 1)?[0] as i8)),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(arr(b(self, 2)?)))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(arr(b(self, 2)?)))),
            4 => MetaValue::Uint(u64::from(u32::from_le_bytes(arr(b(self, 4)?)))),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(arr(b(self, 4)?)))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(arr(b(self, 4)?)))),
            7 => MetaValue::Bool(b(self, 1)?[0] != 0),
            8 => MetaValue::String(self.string(what)?),
            9 => {
                let item = self.u32(what)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(min, what)?;
                let items = (0..n)
                    .map(|_| self.value(item, what))
                    .collect::<std::result::Result<_, _>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::Uint(u64::from_le_bytes(arr(b(self, 8)?))),
            11 => MetaValue::Int(i64::from_le_bytes(arr(b(self, 8)?))),
            12 => MetaValue::Float(f64::from_le_bytes(arr(b(self, 8)?))),
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    b.try_into().unwrap_or([0; N])
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; the engine requires that weight
        // files are not modified while a model is loaded from them.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (metadata, tensors) = parse(&map).map_err(|message| EngineError::Gguf {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Every metadata key.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.keys().map(String::as_str)
    }

    /// The directory entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Every tensor name.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The stored bytes of a tensor (quantized blocks as they are).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// The tensor `name` dequantized to f32, with its shape outermost
    /// first; errors name the file, the tensor and its type.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name).ok_or_else(|| EngineError::Weights {
            path: self.path.clone(),
            tensor: name.to_owned(),
            message: "missing".into(),
        })?;
        let mut out = vec![0f32; info.dims.iter().product()];
        super::dequant::dequantize(info.ty, self.tensor_data(info), &mut out);
        Ok((info.shape(), out))
    }
}

type Parsed = (HashMap<String, MetaValue>, HashMap<String, TensorInfo>);

fn parse(data: &[u8]) -> std::result::Result<Parsed, String> {
    let mut c = Cursor { data, at: 0 };
    let magic = c.take(4, "the magic number").map_err(|_| {
        format!(
            "not a GGUF file: {} bytes, shorter than the magic number",
            data.len()
        )
    })?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: magic {magic:02x?}, expected \"GGUF\""
        ));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let n_tensors = c.count(24, "the tensor count")?;
    let n_kv = c.count(12, "the metadata count")?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("the type of `{key}`"))?;
        let value = c.value(ty, &format!("metadata `{key}`"))?;
        metadata.insert(key, value);
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor name {i}"))?;
        let n_dims = c.u32(&format!("tensor `{name}`: dimension count"))?;
        if n_dims > 4 {
            return Err(format!("tensor `{name}`: {n_dims} dimensions (at most 4)"));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64(&format!("tensor `{name}`: dimensions")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ty_id = c.u32(&format!("tensor `{name}`: type"))?;
        let offset = c.u64(&format!("tensor `{name}`: offset"))?;
        raw.push((name, dims, ty_id, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or("metadata `general.alignment` is not a power of two")?,
    };
    let data_start = (c.at as u64).div_ceil(alignment) * alignment;
    let mut tensors = HashMap::with_capacity(n_tensors);
    for (name, dims, ty_id, offset) in raw {
        let info = tensor_info(&name, &dims, ty_id, offset, data_start, data.len())?;
        tensors.insert(name, info);
    }
    Ok((metadata, tensors))
}

fn tensor_info(
    name: &str,
    dims: &[u64],
    ty_id: u32,
    offset: u64,
    data_start: u64,
    file_len: usize,
) -> std::result::Result<TensorInfo, String> {
    let ty = GgmlType::from_id(ty_id).map_err(|e| format!("tensor `{name}`: {e}"))?;
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let elems = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            format!(
                "tensor `{name}` ({}): dimensions {dims:?} overflow",
                ty.name()
            )
        })?;
    if dims.first().is_some_and(|&d| d % ty.block_elems() != 0) {
        return Err(format!(
            "tensor `{name}` ({}): rows of {} elements are not whole blocks of {}",
            ty.name(),
            dims[0],
            ty.block_elems()
        ));
    }
    let len = ty
        .bytes_for(elems)
        .ok_or_else(|| format!("tensor `{name}` ({}): size overflows", ty.name()))?;
    let start = data_start
        .checked_add(offset)
        .filter(|s| {
            s.checked_add(len as u64)
                .is_some_and(|e| e <= file_len as u64)
        })
        .ok_or_else(|| {
            format!(
                "truncated: tensor `{name}` ({}, {len} bytes at data offset {offset}) \
                 extends past the end of the file ({file_len} bytes)",
                ty.name()
            )
        })?;
    Ok(TensorInfo {
        ty,
        dims,
        start: start as usize,
        len,
    })
}
