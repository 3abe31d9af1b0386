//! A hardware-walk oracle: translates an IOVA by reading raw physical memory the way an SMMU
//! or Mali MMU table walker does, starting from the **register values** a driver programs.
//!
//! It deliberately shares no code with the engine: it re-derives the walk geometry from
//! TCR/VTCR fields (T0SZ, TG, SL0) instead of [`Config`](iopt_api::Config), decodes descriptor
//! bits itself, and reads memory only through [`PhysRead`]. A bug in the engine's index
//! arithmetic, descriptor encoding or table linking therefore shows up as a disagreement
//! between the engine's lookup and this walk, rather than being mirrored by it.
//!
//! Faults follow the architecture's classes: translation (invalid descriptor or input out of
//! range), address size (output or table address beyond the output size), access flag (AF
//! clear on stage 1/2), permission, and an external abort when a table address is not backed
//! by memory (a freed or foreign page).

use iopt_api::{Format, PhysAddr, Registers};

/// Read access to physical memory, as a device's table walker has it.
pub trait PhysRead {
    /// Reads the aligned 64-bit word at `pa`, or `None` if nothing backs it.
    fn read_u64(&self, pa: PhysAddr) -> Option<u64>;
}

impl PhysRead for crate::SimMemory {
    fn read_u64(&self, pa: PhysAddr) -> Option<u64> {
        crate::SimMemory::read_u64(self, pa)
    }
}

/// Atomic update of physical memory, as an SMMU with hardware table updates (HTTU) has it.
pub trait PhysUpdate: PhysRead {
    /// Atomically ANDs `mask` into the word at `pa` and returns the old value, or `None` if
    /// nothing backs it.
    fn fetch_and_u64(&self, pa: PhysAddr, mask: u64) -> Option<u64>;
}

impl PhysUpdate for crate::SimMemory {
    fn fetch_and_u64(&self, pa: PhysAddr, mask: u64) -> Option<u64> {
        crate::SimMemory::fetch_and_u64(self, pa, mask)
    }
}

/// The kind of access a device makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access {
    /// A write (otherwise a read).
    pub write: bool,
    /// An instruction fetch.
    pub exec: bool,
    /// A privileged access (stage 1 only distinguishes it).
    pub privileged: bool,
}

impl Access {
    /// An unprivileged data read.
    pub const READ: Self = Self {
        write: false,
        exec: false,
        privileged: false,
    };
    /// An unprivileged data write.
    pub const WRITE: Self = Self {
        write: true,
        exec: false,
        privileged: false,
    };
}

/// Why the walker faulted, and at which level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// No valid descriptor, or the input address is outside the configured range.
    Translation {
        /// Level of the fault.
        level: u32,
    },
    /// An output or next-table address exceeds the output address size.
    AddressSize {
        /// Level of the fault.
        level: u32,
    },
    /// The leaf's access flag is clear.
    AccessFlag {
        /// Level of the fault.
        level: u32,
    },
    /// The leaf does not grant the access.
    Permission {
        /// Level of the fault.
        level: u32,
    },
    /// A table address is not backed by memory.
    External {
        /// Level of the table read.
        level: u32,
        /// The address read.
        pa: PhysAddr,
    },
}

/// The memory type a leaf selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Device memory (nGnRE and stricter).
    Device,
    /// Normal memory, write-back cacheable.
    NormalWriteBack,
    /// Normal memory, non-cacheable.
    NormalNonCacheable,
    /// Anything else (an unexpected attribute encoding).
    Other(u8),
}

/// A successful hardware translation.
#[allow(clippy::struct_excessive_bools)] // one flag per permission, as the hardware reports them
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HwTranslation {
    /// Output address.
    pub pa: PhysAddr,
    /// Level of the leaf.
    pub level: u32,
    /// Bytes the leaf maps.
    pub leaf_size: u64,
    /// Whether a read is allowed.
    pub readable: bool,
    /// Whether a write is allowed (stage 1 with DBM: allowed, and makes the leaf dirty).
    pub writable: bool,
    /// Whether instruction fetch is allowed.
    pub executable: bool,
    /// Memory type.
    pub mem: MemType,
    /// Shareability field (2 outer, 3 inner).
    pub shareability: u8,
    /// The leaf's NS bit (stage 2 has none).
    pub non_secure: bool,
}

/// Walk parameters derived from register values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walker {
    format: Format,
    root: PhysAddr,
    page_shift: u32,
    ias: u32,
    oas: u32,
    start_level: u32,
    ttbr1: bool,
    mair: u64,
}

const fn ps_bits(ps: u8) -> u32 {
    match ps {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

impl Walker {
    /// Derives the walk from a table's registers. `ttbr1` says the stage-1 TCR fields are the
    /// TTBR1 ones (TG1 encoding, upper-half inputs). Mali's TRANSTAB carries no input size, so
    /// `mali_ias` gives it (the GPU's `mmu_features`); other formats ignore it.
    #[must_use]
    pub fn from_registers(
        format: Format,
        regs: &Registers,
        ttbr1: bool,
        mali_ias: u32,
    ) -> Option<Self> {
        let (page_shift, ias, oas, start_level, root, mair) = match *regs {
            Registers::Stage1 { ttbr, tcr, mair } => {
                let shift = if ttbr1 {
                    match tcr.tg {
                        1 => 14,
                        2 => 12,
                        3 => 16,
                        _ => return None,
                    }
                } else {
                    match tcr.tg {
                        0 => 12,
                        1 => 16,
                        2 => 14,
                        _ => return None,
                    }
                };
                let ias = 64u32.checked_sub(u32::from(tcr.tsz))?;
                let bpl = shift - 3;
                // The walk starts at the level whose table resolves the top input bit; an
                // input size that needs more than four levels, or less than one, is not a
                // walk the hardware makes (T0SZ out of range faults every access).
                let levels = ias.checked_sub(shift).filter(|&b| b > 0)?.div_ceil(bpl);
                (
                    shift,
                    ias,
                    ps_bits(tcr.ips),
                    4u32.checked_sub(levels)?,
                    ttbr,
                    mair,
                )
            }
            Registers::Stage2 { vttbr, vtcr } => {
                let shift = match vtcr.tg {
                    0 => 12,
                    1 => 16,
                    2 => 14,
                    _ => return None,
                };
                let sl = u32::from(vtcr.sl);
                let start = if shift == 12 {
                    2u32.checked_sub(sl)?
                } else {
                    3u32.checked_sub(sl)?
                };
                (
                    shift,
                    64u32.checked_sub(u32::from(vtcr.tsz))?,
                    ps_bits(vtcr.ps),
                    start,
                    vttbr,
                    0,
                )
            }
            Registers::Mali { transtab, memattr } => {
                if transtab & 3 != 3 {
                    return None;
                }
                (
                    12,
                    mali_ias,
                    40,
                    0,
                    PhysAddr::new(transtab & !0xfff),
                    memattr,
                )
            }
            _ => return None,
        };
        Some(Self {
            format,
            root,
            page_shift,
            ias,
            oas,
            start_level,
            ttbr1,
            mair,
        })
    }

    fn shift_of(&self, level: u32) -> u32 {
        self.page_shift + (3 - level) * (self.page_shift - 3)
    }

    fn out_addr(&self, d: u64) -> u64 {
        let a = d & 0x0000_ffff_ffff_f000;
        if self.page_shift == 16 {
            (a & !0xffff) | ((a >> 12 & 0xf) << 48)
        } else {
            a
        }
    }

    /// Translates `iova` for `access` by walking memory.
    ///
    /// # Errors
    ///
    /// The [`Fault`] the hardware would report.
    pub fn translate<M: PhysRead + ?Sized>(
        &self,
        mem: &M,
        iova: u64,
        access: Access,
    ) -> Result<HwTranslation, Fault> {
        self.walk(mem, iova, access).map(|(t, _, _)| t)
    }

    /// Performs a device **write** the way an SMMU with HTTU dirty-state updates does: a write
    /// through a stage-1 leaf that has DBM set and AP\[2\] set clears AP\[2\] atomically
    /// (marking it dirty) and proceeds.
    ///
    /// # Errors
    ///
    /// The [`Fault`] the hardware would report.
    pub fn device_write<M: PhysUpdate + ?Sized>(
        &self,
        mem: &M,
        iova: u64,
    ) -> Result<HwTranslation, Fault> {
        let (t, at, d) = self.walk(mem, iova, Access::WRITE)?;
        let stage1 = matches!(self.format, Format::Arm32S1 | Format::Arm64S1);
        if stage1 && d & (1 << 51) != 0 && d & (1 << 7) != 0 {
            mem.fetch_and_u64(at, !(1 << 7)).ok_or(Fault::External {
                level: t.level,
                pa: at,
            })?;
        }
        Ok(t)
    }

    /// Walks to the leaf for `iova` and checks `access`; returns the translation, the address
    /// of the leaf descriptor and the descriptor.
    fn walk<M: PhysRead + ?Sized>(
        &self,
        mem: &M,
        iova: u64,
        access: Access,
    ) -> Result<(HwTranslation, PhysAddr, u64), Fault> {
        let top = if self.ias >= 64 { 0 } else { iova >> self.ias };
        let want = if self.ttbr1 && self.ias < 64 {
            u64::MAX >> self.ias
        } else {
            0
        };
        if top != want {
            return Err(Fault::Translation {
                level: self.start_level,
            });
        }
        let input = if self.ias >= 64 {
            iova
        } else {
            iova & ((1u64 << self.ias) - 1)
        };
        let mut table = self.root.get();
        let mut level = self.start_level;
        loop {
            let shift = self.shift_of(level);
            // The top table takes every remaining input bit (a concatenated stage-2 root
            // simply has more entries); lower tables take one level's worth.
            let idx = if level == self.start_level {
                input >> shift
            } else {
                (input >> shift) & ((1u64 << (self.page_shift - 3)) - 1)
            };
            // A root index past the address space (an input size the root cannot hold) is
            // an external abort, not an overflow.
            let addr = idx
                .checked_mul(8)
                .and_then(|o| table.checked_add(o))
                .map(PhysAddr::new)
                .ok_or(Fault::External {
                    level,
                    pa: PhysAddr::new(table),
                })?;
            let d = mem
                .read_u64(addr)
                .ok_or(Fault::External { level, pa: addr })?;
            if d & 1 == 0 {
                return Err(Fault::Translation { level });
            }
            let is_table = level < 3 && d & 2 != 0;
            let is_leaf = if level == 3 {
                if self.format == Format::Mali {
                    d & 3 == 1
                } else {
                    d & 3 == 3
                }
            } else {
                d & 3 == 1
            };
            let out = self.out_addr(d);
            if out >> self.oas != 0 {
                return Err(Fault::AddressSize { level });
            }
            if is_table {
                table = out;
                level += 1;
                continue;
            }
            if !is_leaf {
                return Err(Fault::Translation { level });
            }
            return self
                .leaf(d, out, level, input, access)
                .map(|t| (t, addr, d));
        }
    }

    fn leaf(
        &self,
        d: u64,
        out: u64,
        level: u32,
        input: u64,
        access: Access,
    ) -> Result<HwTranslation, Fault> {
        let size = 1u64 << self.shift_of(level);
        if self.format != Format::Mali && d & (1 << 10) == 0 {
            return Err(Fault::AccessFlag { level });
        }
        let xn = d >> 53 & 3 != 0;
        let (readable, writable, mem) = match self.format {
            Format::Arm32S1 | Format::Arm64S1 => {
                let ap_el0 = d & (1 << 6) != 0;
                let ro = d & (1 << 7) != 0;
                let dbm = d & (1 << 51) != 0;
                // Unprivileged accesses need AP[1]; privileged ones are always allowed to read.
                let readable = access.privileged || ap_el0;
                let writable = readable && (!ro || dbm);
                let idx = (d >> 2) & 7;
                let attr = ((self.mair >> (idx * 8)) & 0xff) as u8;
                (readable, writable, mair_type(attr))
            }
            Format::Mali => {
                let idx = (d >> 2) & 7;
                let attr = ((self.mair >> (idx * 8)) & 0xff) as u8;
                let mem = match attr {
                    0x8d => MemType::NormalWriteBack,
                    0x88 if idx == 2 => MemType::Device,
                    0x88 => MemType::NormalNonCacheable,
                    a => MemType::Other(a),
                };
                (d & (1 << 6) != 0, d & (1 << 7) != 0, mem)
            }
            _ => {
                let memattr = ((d >> 2) & 0xf) as u8;
                let mem = match memattr {
                    0b0001 => MemType::Device,
                    0b1111 | 0b0110 => MemType::NormalWriteBack,
                    0b0101 => MemType::NormalNonCacheable,
                    a => MemType::Other(a),
                };
                (d & (1 << 6) != 0, d & (1 << 7) != 0, mem)
            }
        };
        let allowed = if access.exec {
            readable && !xn
        } else if access.write {
            writable
        } else {
            readable
        };
        if !allowed {
            return Err(Fault::Permission { level });
        }
        Ok(HwTranslation {
            pa: PhysAddr::new(out | (input & (size - 1))),
            level,
            leaf_size: size,
            readable,
            writable,
            executable: readable && !xn,
            mem,
            shareability: ((d >> 8) & 3) as u8,
            // Bit 5 is NS in a stage-1 leaf; in a stage-2 leaf it is MemAttr[3].
            non_secure: !self.format.is_stage2() && d & (1 << 5) != 0,
        })
    }
}

fn mair_type(attr: u8) -> MemType {
    match attr {
        0x00..=0x0f => MemType::Device,
        0x44 => MemType::NormalNonCacheable,
        0xff => MemType::NormalWriteBack,
        a => MemType::Other(a),
    }
}
