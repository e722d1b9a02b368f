//! A minimal GGUF writer for tests: metadata and raw tensors, version 3,
//! alignment 32. Enough to make small valid files and to break them on
//! purpose.

#![allow(dead_code)] // each test binary uses part of it

pub mod model;

/// A metadata value to write.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// A tensor to write: name, dims innermost first, ggml type id, bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn meta(out: &mut Vec<u8>, value: &Meta) {
    let u32le = |out: &mut Vec<u8>, v: u32| out.extend(v.to_le_bytes());
    match value {
        Meta::U32(v) => {
            u32le(out, 4);
            u32le(out, *v);
        }
        Meta::F32(v) => {
            u32le(out, 6);
            out.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            u32le(out, 7);
            out.push(u8::from(*v));
        }
        Meta::Str(s) => {
            u32le(out, 8);
            string(out, s);
        }
        Meta::Strs(items) => {
            u32le(out, 9);
            u32le(out, 8);
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|s| string(out, s));
        }
        Meta::I32s(items) => {
            u32le(out, 9);
            u32le(out, 5);
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
        Meta::F32s(items) => {
            u32le(out, 9);
            u32le(out, 6);
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
    }
}

/// The bytes of a GGUF file holding `kv` and `tensors`.
pub fn gguf_bytes(kv: &[(&str, Meta)], tensors: &[RawTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        string(&mut out, key);
        meta(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// An F32 tensor of `shape` (outermost first).
pub fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> RawTensor {
    RawTensor {
        name: name.to_owned(),
        dims: shape.iter().rev().map(|&d| d as u64).collect(),
        ty: 0,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
