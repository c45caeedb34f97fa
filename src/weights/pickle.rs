//! A small, safe pickle interpreter: enough of protocols 2-5 to read PyTorch checkpoints.
//!
//! Hand-written because no maintained crate reads torch's persistent-id storages, the legacy
//! (pre-zip) stream layout and strided views together; it never executes code: classes become
//! [`Value::Global`] names and calls become [`Value::Object`] records that the caller interprets.
//!
//! A `.pth` file is untrusted input, so the machine works within budgets: only the globals a
//! weights file needs are accepted (as PyTorch's `weights_only` does), values nest at most
//! [`MAX_DEPTH`] deep, and the values it builds or copies (memo references re-used many times
//! included) are counted against a bound proportional to the stream's length.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (little-endian two's complement bytes), e.g. torch's magic number.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)` recorded, not executed; `state` from BUILD, `items` from SETITEM(S).
    Object {
        callable: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
    /// A persistent id (torch storages).
    Persistent(Box<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    pub fn global_name(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle stream ends early (truncated file?) at byte {0}")]
    Truncated(usize),
    #[error("unsupported pickle opcode 0x{op:02x} at byte {pos}")]
    Opcode { op: u8, pos: usize },
    #[error("malformed pickle at byte {pos}: {why}")]
    Malformed { pos: usize, why: String },
    #[error(
        "the pickle names the Python global `{0}`, which a weights file has no use for (only tensors, storages and plain containers are accepted, as torch.load(weights_only=True) does)"
    )]
    Forbidden(String),
    #[error(
        "the pickle expands beyond {0} values or {MAX_DEPTH} levels of nesting (a decompression bomb?)"
    )]
    TooLarge(u64),
}

/// Deepest nesting of containers accepted (PyTorch checkpoints nest a handful of levels).
pub const MAX_DEPTH: u32 = 64;

/// The globals a weights file may name: tensor rebuilders, storage types, OrderedDict, and the
/// plain records training checkpoints carry beside their state dicts (argparse's Namespace, numpy
/// scalars). They are recorded, never called.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
        ),
        "torch" => name.ends_with("Storage") || matches!(name, "Size" | "device" | "float32"),
        "torch.storage" => name == "UntypedStorage" || name == "TypedStorage",
        "argparse" => name == "Namespace",
        "numpy.core.multiarray" | "numpy._core.multiarray" => name == "scalar",
        "numpy" => name == "dtype",
        "_codecs" => name == "encode",
        _ => false,
    }
}

/// Reads one pickle from `data`; returns the value and the number of bytes consumed.
pub fn load(data: &[u8]) -> Result<(Value, usize), PickleError> {
    let budget = 100_000 + 16 * data.len() as u64;
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        budget,
        limit: budget,
    }
    .run()
}

/// A value with its nesting depth and the number of values a copy of it holds.
#[derive(Debug, Clone)]
struct Node {
    v: Value,
    depth: u32,
    size: u64,
}

impl Node {
    fn leaf(v: Value) -> Self {
        Node {
            v,
            depth: 1,
            size: 1,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Node>,
    marks: Vec<usize>,
    memo: HashMap<u32, Node>,
    /// Values the machine may still build or copy.
    budget: u64,
    limit: u64,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let start = self.pos;
        let rel = self.data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(start))?;
        self.pos = start + rel + 1;
        Ok(String::from_utf8_lossy(&self.data[start..start + rel]).into_owned())
    }
    fn malformed(&self, why: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            why: why.into(),
        }
    }
    /// Counts `n` values built or copied against the budget.
    fn spend(&mut self, n: u64) -> Result<(), PickleError> {
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or(PickleError::TooLarge(self.limit))?;
        Ok(())
    }
    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        self.spend(1)?;
        self.stack.push(Node::leaf(v));
        Ok(())
    }
    /// Pushes a container of `children` made by `make`.
    fn push_container(
        &mut self,
        children: Vec<Node>,
        make: impl FnOnce(Vec<Value>) -> Value,
    ) -> Result<(), PickleError> {
        let node = self.container(children, make)?;
        self.stack.push(node);
        Ok(())
    }
    fn container(
        &mut self,
        children: Vec<Node>,
        make: impl FnOnce(Vec<Value>) -> Value,
    ) -> Result<Node, PickleError> {
        self.spend(1)?;
        let depth = 1 + children.iter().map(|c| c.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(PickleError::TooLarge(self.limit));
        }
        let size = 1 + children.iter().map(|c| c.size).sum::<u64>();
        Ok(Node {
            v: make(children.into_iter().map(|c| c.v).collect()),
            depth,
            size,
        })
    }
    fn pop_node(&mut self) -> Result<Node, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }
    fn pop(&mut self) -> Result<Value, PickleError> {
        Ok(self.pop_node()?.v)
    }
    fn top(&mut self) -> Result<&mut Node, PickleError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            why: "stack underflow".into(),
        })
    }
    /// Adds `children` to the container on top of the stack with `add`, keeping its depth and size.
    fn extend_top(
        &mut self,
        children: Vec<Node>,
        add: impl FnOnce(&mut Value, Vec<Value>) -> Result<(), String>,
    ) -> Result<(), PickleError> {
        let pos = self.pos;
        let limit = self.limit;
        let top = self.top()?;
        let depth = 1 + children.iter().map(|c| c.depth).max().unwrap_or(0);
        top.depth = top.depth.max(depth);
        top.size += children.iter().map(|c| c.size).sum::<u64>();
        if top.depth > MAX_DEPTH {
            return Err(PickleError::TooLarge(limit));
        }
        add(&mut top.v, children.into_iter().map(|c| c.v).collect())
            .map_err(|why| PickleError::Malformed { pos, why })
    }
    fn pop_mark(&mut self) -> Result<Vec<Node>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("missing MARK"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("MARK beyond stack"));
        }
        Ok(self.stack.split_off(mark))
    }
    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| self.malformed("invalid UTF-8 string"))
    }
    /// Pushes a copy of `node`, paying for every value it holds.
    fn push_copy(&mut self, node: Node) -> Result<(), PickleError> {
        self.spend(node.size)?;
        self.stack.push(node);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let size = self
            .memo
            .get(&key)
            .map(|n| n.size)
            .ok_or_else(|| self.malformed(format!("memo key {key} missing")))?;
        // Paid for before the copy is made.
        self.spend(size)?;
        let node = self.memo[&key].clone();
        self.stack.push(node);
        Ok(())
    }
    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let size = self.top()?.size;
        self.spend(size)?;
        let node = self.top()?.clone();
        self.memo.insert(key, node);
        Ok(())
    }
    fn global(&mut self, module: String, name: String) -> Result<(), PickleError> {
        if !allowed(&module, &name) {
            let full = format!("{module}.{name}");
            return Err(PickleError::Forbidden(crate::util::quote_for_message(
                &full,
            )));
        }
        self.push(Value::Global { module, name })
    }
    fn set_items(&mut self, items: Vec<Node>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of dict items"));
        }
        self.extend_top(items, |top, items| match top {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            _ => Err("SETITEM(S) on a non-dict".into()),
        })
    }

    fn run(mut self) -> Result<(Value, usize), PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME: framing is only a read-ahead hint
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.push(long_from_bytes(bytes))?;
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.push(long_from_bytes(bytes))?;
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| self.malformed("bad INT"))?),
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let l = self.line()?;
                    let v = l
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| self.malformed("bad LONG"))?;
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l.parse().map_err(|_| self.malformed("bad FLOAT"))?;
                    self.push(Value::Float(v))?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = Value::Bytes(self.take(n)?.to_vec());
                    self.push(v)?
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = Value::Bytes(self.take(n)?.to_vec());
                    self.push(v)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = Value::Bytes(self.take(n)?.to_vec());
                    self.push(v)?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = Value::Bytes(self.take(n)?.to_vec());
                    self.push(v)?
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let v = Value::Bytes(self.take(n)?.to_vec());
                    self.push(v)?
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Value::Str(l))?;
                }
                b'S' => {
                    let l = self.line()?;
                    self.push(Value::Str(
                        l.trim_matches(|c| c == '\'' || c == '"').to_string(),
                    ))?;
                }
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_container(items, Value::Tuple)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_container(items, Value::List)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()))?;
                    self.set_items(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_container(items, Value::Tuple)?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len())
                        .map_err(|_| self.malformed("memo overflow"))?;
                    self.memo_put(k)?
                }
                b'p' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| self.malformed("bad PUT"))?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'g' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| self.malformed("bad GET"))?;
                    self.memo_get(k)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let node = self.top()?.clone();
                    self.push_copy(node)?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => self.global(module, name)?,
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' | 0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // NEWOBJ_EX's kwargs
                    }
                    let args = self.pop_node()?;
                    let callable = self.pop_node()?;
                    self.push_container(vec![callable, args], |mut parts| {
                        let args = parts.pop().expect("two parts");
                        reduce(parts.pop().expect("two parts"), args)
                    })?;
                }
                b'b' => {
                    let state = self.pop_node()?;
                    self.extend_top(vec![state], |top, mut state| {
                        match top {
                            // OrderedDict state is the `_metadata` attribute: not needed.
                            Value::Dict(_) => {}
                            Value::Object { state: s, .. } => {
                                *s = state.pop().map(Box::new);
                            }
                            _ => {}
                        }
                        Ok(())
                    })?;
                }
                b's' => {
                    let v = self.pop_node()?;
                    let k = self.pop_node()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop_node()?]
                    } else {
                        self.pop_mark()?
                    };
                    self.extend_top(items, |top, items| match top {
                        Value::List(l) => {
                            l.extend(items);
                            Ok(())
                        }
                        _ => Err("APPEND(S) on a non-list".into()),
                    })?;
                }
                b'Q' => {
                    let pid = self.pop_node()?;
                    self.push_container(vec![pid], |mut p| {
                        Value::Persistent(Box::new(p.pop().expect("one part")))
                    })?;
                }
                b'P' => {
                    let pid = self.line()?;
                    self.push(Value::Persistent(Box::new(Value::Str(pid))))?;
                }
                _ => return Err(PickleError::Opcode { op, pos: at }),
            }
        }
    }
}

/// `OrderedDict()` becomes a plain dict so SETITEMS can fill it; everything else is recorded.
fn reduce(callable: Value, args: Value) -> Value {
    if let Some(("collections", "OrderedDict")) = callable.global_name() {
        return Value::Dict(Vec::new());
    }
    Value::Object {
        callable: Box::new(callable),
        args: Box::new(args),
        state: None,
    }
}

fn long_from_bytes(bytes: Vec<u8>) -> Value {
    if bytes.len() <= 8 {
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..bytes.len()].copy_from_slice(&bytes);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_protocol_2_dict() {
        // pickle.dumps({'a': (1, -2, 3.5), 'b': [True, None, 'x']}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x87q\x02X\x01\x00\x00\x00bq\x03]q\x04(\x88NX\x01\x00\x00\x00xq\x05eu.";
        let (v, used) = load(data).unwrap();
        assert_eq!(used, data.len());
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::Tuple(vec![Value::Int(1), Value::Int(-2), Value::Float(3.5)])
                ),
                (
                    Value::Str("b".into()),
                    Value::List(vec![Value::Bool(true), Value::None, Value::Str("x".into())])
                ),
            ])
        );
    }

    #[test]
    fn big_longs_and_truncation() {
        // pickle.dumps(119547037146038801333356, protocol=2): torch's legacy magic number
        let data = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        let (v, _) = load(data).unwrap();
        assert!(matches!(v, Value::BigInt(ref b) if b.len() == 10));
        assert!(matches!(load(&data[..6]), Err(PickleError::Truncated(_))));
        assert!(matches!(
            load(b"\x80\x02\xff."),
            Err(PickleError::Opcode { op: 0xff, .. })
        ));
    }
}
