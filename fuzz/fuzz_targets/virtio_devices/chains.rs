//! Guest memory as plain bytes, read the way `virtio-queue` reads it: descriptor chains from the
//! available rings, and the little-endian fields of the rings. The driver uses it to know which
//! bytes a device may write in a step and how many bytes each chain lets it write.

pub const DESCRIPTOR_NEXT: u16 = 1;
pub const DESCRIPTOR_WRITE: u16 = 2;
pub const DESCRIPTOR_INDIRECT: u16 = 4;

/// `[start, end)` in guest memory.
pub type Range = (u64, u64);

pub fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Where a queue's descriptors and available ring are, and its size.
#[derive(Debug, Clone, Copy)]
pub struct Rings {
    pub size: u16,
    pub descriptors: u64,
    pub available: u64,
}

/// One chain as `virtio-queue` would parse it.
pub struct Chain {
    /// How many bytes its device-writable buffers hold.
    pub writable: u64,
    /// Its device-writable buffers, in order.
    pub ranges: Vec<Range>,
}

/// Every chain on the available rings of the ready queues, parsed from memory before a step.
pub struct Walk {
    /// Per queue (by index), per head: the chain, for heads on the ring.
    chains: Vec<Vec<Option<Chain>>>,
    /// The device-writable buffers of every chain, merged.
    pub writable: Vec<Range>,
    /// Everything the parse read (available rings, descriptor tables, indirect tables), merged.
    pub read: Vec<Range>,
}

impl Walk {
    /// Parses the chains of `queues` (by queue index), out of `count` queues.
    pub fn new(memory: &[u8], count: usize, queues: &[(usize, Rings)]) -> Self {
        let mut walk = Self {
            chains: Vec::new(),
            writable: Vec::new(),
            read: Vec::new(),
        };
        walk.chains.resize_with(count, Vec::new);
        for &(q, registers) in queues {
            let size = registers.size;
            walk.read.push((
                registers.available,
                registers.available + 6 + 2 * u64::from(size),
            ));
            let mut chains: Vec<Option<Chain>> = (0..size).map(|_| None).collect();
            for slot in 0..u64::from(size) {
                let Some(head) = read_u16(memory, registers.available + 4 + 2 * slot) else {
                    continue;
                };
                if head >= size || chains[usize::from(head)].is_some() {
                    continue;
                }
                let chain = parse_chain(memory, registers.descriptors, size, head, &mut walk.read);
                walk.writable.extend(&chain.ranges);
                chains[usize::from(head)] = Some(chain);
            }
            walk.chains[q] = chains;
        }
        walk.writable = merge(walk.writable);
        walk.read = merge(walk.read);
        walk
    }

    pub fn chain(&self, queue: usize, head: u16) -> Option<&Chain> {
        self.chains.get(queue)?.get(usize::from(head))?.as_ref()
    }
}

/// `virtio_queue::DescriptorChain`'s iteration: a chain ends at a link beyond its table, after
/// as many descriptors as the table holds, at an unreadable descriptor, at more than 4 GiB, or at
/// a nested or misaligned indirect table.
fn parse_chain(memory: &[u8], table: u64, size: u16, head: u16, read: &mut Vec<Range>) -> Chain {
    let mut chain = Chain {
        writable: 0,
        ranges: Vec::new(),
    };
    let (mut table, mut size, mut next, mut ttl) = (table, size, head, size);
    let mut indirect = false;
    let mut yielded = 0u32;
    while ttl > 0 && next < size {
        let Some(address) = table.checked_add(u64::from(next) * 16) else {
            break;
        };
        read.push((address, address.saturating_add(16)));
        let Some(descriptor) = read_bytes::<16>(memory, address) else {
            break;
        };
        let field = |at: usize, len: usize| {
            let mut bytes = [0u8; 8];
            bytes[..len].copy_from_slice(&descriptor[at..at + len]);
            u64::from_le_bytes(bytes)
        };
        let (buffer, len) = (field(0, 8), field(8, 4) as u32);
        let (flags, link) = (field(12, 2) as u16, field(14, 2) as u16);
        if flags & DESCRIPTOR_INDIRECT != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                break;
            }
            (table, size, next, ttl, indirect) =
                (buffer, (len / 16) as u16, 0, (len / 16) as u16, true);
            continue;
        }
        let Some(total) = yielded.checked_add(len) else {
            break;
        };
        yielded = total;
        if flags & DESCRIPTOR_WRITE != 0 {
            chain.writable += u64::from(len);
            chain
                .ranges
                .push((buffer, buffer.saturating_add(u64::from(len))));
        }
        if flags & DESCRIPTOR_NEXT != 0 {
            next = link;
            ttl -= 1;
        } else {
            ttl = 0;
        }
    }
    chain
}

/// The first `len` bytes the chain's writable buffers hold.
pub fn gather(memory: &[u8], ranges: &[Range], len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    let size = memory.len() as u64;
    for &(start, end) in ranges {
        let (start, end) = (start.min(size) as usize, end.min(size) as usize);
        let take = (end - start).min(len - bytes.len());
        bytes.extend_from_slice(&memory[start..start + take]);
        if bytes.len() == len {
            break;
        }
    }
    bytes
}

/// Sorted, without empty ranges, overlapping and touching ones joined: what [`intersects`] and
/// [`covers`] search.
pub fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|&(start, end)| start < end);
    ranges.sort_unstable();
    let mut merged: Vec<Range> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether `range` overlaps one of `merged`.
pub fn intersects(merged: &[Range], range: Range) -> bool {
    // Merged ranges end in order too: the last one starting before `range` ends reaches furthest.
    let before = merged.partition_point(|&(start, _)| start < range.1);
    before > 0 && merged[before - 1].1 > range.0
}

/// Whether one of `merged` holds all of `range`.
pub fn covers(merged: &[Range], range: Range) -> bool {
    let before = merged.partition_point(|&(start, _)| start <= range.0);
    before > 0 && merged[before - 1].1 >= range.1
}

/// The runs of bytes that differ. This runs after every call into the device, over all of guest
/// memory: equal pages, then equal 16-byte pieces, are skipped with one comparison each.
pub fn changed_runs(before: &[u8], after: &[u8]) -> Vec<Range> {
    const PAGE: usize = 4096;
    const PIECE: usize = 16;
    let mut runs: Vec<Range> = Vec::new();
    if before == after {
        return runs;
    }
    let mut start = 0;
    while start < before.len() {
        let end = (start + PAGE).min(before.len());
        if before[start..end] != after[start..end] {
            let mut piece = start;
            while piece < end {
                let piece_end = (piece + PIECE).min(end);
                if before[piece..piece_end] != after[piece..piece_end] {
                    for at in piece..piece_end {
                        if before[at] == after[at] {
                            continue;
                        }
                        let at = at as u64;
                        match runs.last_mut() {
                            Some(last) if last.1 == at => last.1 = at + 1,
                            _ => runs.push((at, at + 1)),
                        }
                    }
                }
                piece = piece_end;
            }
        }
        start = end;
    }
    runs
}

fn read_bytes<const N: usize>(memory: &[u8], address: u64) -> Option<[u8; N]> {
    let start = usize::try_from(address).ok()?;
    memory.get(start..start.checked_add(N)?)?.try_into().ok()
}

pub fn read_u16(memory: &[u8], address: u64) -> Option<u16> {
    read_bytes(memory, address).map(u16::from_le_bytes)
}

pub fn read_u32(memory: &[u8], address: u64) -> Option<u32> {
    read_bytes(memory, address).map(u32::from_le_bytes)
}
