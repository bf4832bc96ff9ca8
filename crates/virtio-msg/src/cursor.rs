//! Bounds-checked little-endian cursors; the only place that touches raw bytes.

/// Reads little-endian fields; a read past the end yields `None` (or 0 for the
/// infallible helpers, used only after the caller has checked the length).
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn le16(&mut self) -> u16 {
        self.u16().unwrap_or(0)
    }
    pub(crate) fn le32(&mut self) -> u32 {
        self.array().map(u32::from_le_bytes).unwrap_or(0)
    }
    pub(crate) fn le64(&mut self) -> u64 {
        self.array().map(u64::from_le_bytes).unwrap_or(0)
    }
}

/// Writes little-endian fields; running out of room sets a flag instead of panicking.
pub(crate) struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self {
            out,
            pos: 0,
            overflow: false,
        }
    }
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        let end = self.pos.saturating_add(b.len());
        match self.out.get_mut(self.pos..end) {
            Some(dst) if !self.overflow => dst.copy_from_slice(b),
            _ => self.overflow = true,
        }
        self.pos = end;
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    pub(crate) fn le16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn le32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn le64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn patch_le16(&mut self, at: usize, v: u16) {
        if let Some(dst) = self.out.get_mut(at..at.saturating_add(2)) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}
