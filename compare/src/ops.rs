//! What the harness runs: bind jobs and the events of their life (submit, execute, complete),
//! and the table configurations workloads run on.
//!
//! A workload and a replayed trace are the same thing: a [`Workload`], a list of [`Event`]s on
//! one [`TableKind`]. A job is one bind operation (a map or an unmap of a VA range), submitted
//! (queued: the moment a driver must reserve), executed later (the moment it may not allocate)
//! and completed after that (the moment it cleans up).

use iopt_api::{Config, ConfigInput, Format, PageSizes, Prot};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's identity, unique within a workload.
pub type JobId = u64;

/// One bind operation, as a VM_BIND ioctl or a DMA-API call gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BindOp {
    /// Map `size` bytes at `va` to `pa` with `prot` (Linux `IOMMU_*` bits).
    Map {
        /// First IOVA.
        va: u64,
        /// Bytes.
        size: u64,
        /// First physical address; its offset modulo 2 MiB decides whether blocks can be used.
        pa: u64,
        /// Permission bits (`IOMMU_READ` = 1, `IOMMU_WRITE` = 2, ...).
        prot: u32,
    },
    /// Unmap `size` bytes at `va`.
    Unmap {
        /// First IOVA.
        va: u64,
        /// Bytes.
        size: u64,
    },
}

impl BindOp {
    /// Returns the VA range `(va, size)` of the operation.
    #[must_use]
    pub const fn range(&self) -> (u64, u64) {
        match *self {
            BindOp::Map { va, size, .. } | BindOp::Unmap { va, size } => (va, size),
        }
    }

    /// Returns the protection bits as a [`Prot`] (maps only).
    #[must_use]
    pub fn prot(&self) -> Option<Prot> {
        match *self {
            BindOp::Map { prot, .. } => Some(Prot::from_bits_retain(prot)),
            BindOp::Unmap { .. } => None,
        }
    }
}

impl fmt::Display for BindOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BindOp::Map { va, size, pa, prot } => {
                write!(f, "map {va:#x} {size:#x} {pa:#x} {prot:#x}")
            }
            BindOp::Unmap { va, size } => write!(f, "unmap {va:#x} {size:#x}"),
        }
    }
}

/// One event in the life of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// The job is queued: a driver reserves what it will need now.
    Submit {
        /// The job.
        id: JobId,
        /// What it does.
        op: BindOp,
    },
    /// The job runs (in the fence-signalling path: no allocation allowed).
    Execute {
        /// The job.
        id: JobId,
    },
    /// The job's cleanup runs (after its fence): unused reservations go back.
    Complete {
        /// The job.
        id: JobId,
    },
}

impl Event {
    /// Returns the job the event belongs to.
    #[must_use]
    pub const fn id(&self) -> JobId {
        match *self {
            Event::Submit { id, .. } | Event::Execute { id } | Event::Complete { id } => id,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Submit { id, op } => write!(f, "submit {id} {op}"),
            Event::Execute { id } => write!(f, "execute {id}"),
            Event::Complete { id } => write!(f, "complete {id}"),
        }
    }
}

/// The table configurations workloads run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum TableKind {
    /// panthor's GPU table: `ARM_64_LPAE_S1`, 4 KiB | 2 MiB pages (no 1 GiB blocks), 48-bit
    /// VA, 48-bit PA, a non-coherent walker (as on RK3588). The configuration of the worked
    /// examples in docs/designs.md §8.
    #[default]
    Panthor,
    /// An SMMUv3 stage-1 table as iommu-dma and VFIO use it: `ARM_64_LPAE_S1`, 4 KiB | 2 MiB |
    /// 1 GiB pages, 48-bit VA and PA, a coherent walker.
    Smmu,
}

impl TableKind {
    /// Returns the name used in traces and reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            TableKind::Panthor => "panthor",
            TableKind::Smmu => "smmu",
        }
    }

    /// Parses a name given by [`name`](Self::name).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "panthor" => Some(TableKind::Panthor),
            "smmu" => Some(TableKind::Smmu),
            _ => None,
        }
    }

    /// Returns the validated configuration.
    ///
    /// # Panics
    ///
    /// Never: both configurations are valid (a unit test builds them).
    #[must_use]
    pub fn config(self) -> Config {
        // Panthor's most common host (RK3588) walks without IO coherency, so its table
        // cleans every write; a server SMMU walks coherently.
        let (sizes, coherent) = match self {
            TableKind::Panthor => (PageSizes::from_bits((1 << 12) | (1 << 21)), false),
            TableKind::Smmu => (PageSizes::GRANULE_4K, true),
        };
        Config::new(ConfigInput::new(Format::Arm64S1, sizes, 48, 48).with_coherent_walk(coherent))
            .expect("the built-in configurations are valid")
    }
}

/// A list of events on one table configuration: a generated workload or a replayed trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Short name (the CLI's `--workload` value, or the trace's file name).
    pub name: String,
    /// One line saying what it models.
    pub description: String,
    /// The table it runs on.
    pub table: TableKind,
    /// The events, in order.
    pub events: Vec<Event>,
}

impl Workload {
    /// Returns the number of jobs (submit events).
    #[must_use]
    pub fn jobs(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Submit { .. }))
            .count()
    }
}
