//! Debug views of a table: the descriptors on the path of one IOVA (Linux's `pgtable_walk`),
//! and a human-readable dump of a whole tree in which runs of contiguous leaves collapse into
//! one line. Checkers print these when they report a divergence.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;
use iopt_api::{Config, IoPageTable, Iova, PhysAddr, TableAlloc, WalkItem};
use iopt_lpae::desc::{self, Kind};

/// One step of a walk: the table read, the index used and the descriptor found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalkStep {
    /// Level of the table read.
    pub level: u32,
    /// Physical address of that table.
    pub table: PhysAddr,
    /// Index into it.
    pub index: usize,
    /// The descriptor read (0 when empty).
    pub descriptor: u64,
}

/// Returns the descriptors on the path of `iova` in the tree of configuration `cfg` rooted at
/// `root`, whose pages `mem` holds: from the root down to the first leaf or empty entry (Linux's
/// `pgtable_walk`). Empty outside the input range; stops early at an address `mem` does not
/// back.
///
/// It reads the tables through [`TableAlloc::table`] without taking part in the table's
/// reclamation, so call it while no operation can free tables (a debugger's view, as in
/// Linux).
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot};
/// use iopt_lpae::LpaeTable;
/// use iopt_sim::{SimMemory, debug::walk_path};
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 39, 40))?;
/// let mem = SimMemory::new();
/// let t = LpaeTable::new(cfg, &mem)?;
/// t.map(Iova::new(0x20_0000), PhysAddr::new(0x4000_0000), PageSize::SZ_4K, 1, Prot::READ)?;
/// let path = walk_path(&cfg, t.root(), &mem, Iova::new(0x20_0000));
/// // L1 and L2 tables, then the L3 page descriptor.
/// assert_eq!(path.iter().map(|s| s.level).collect::<Vec<_>>(), [1, 2, 3]);
/// assert_eq!(path[2].descriptor & iopt_lpae::desc::ADDR_MASK, 0x4000_0000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub fn walk_path<A: TableAlloc + ?Sized>(
    cfg: &Config,
    root: PhysAddr,
    mem: &A,
    iova: Iova,
) -> Vec<WalkStep> {
    let mut out = Vec::new();
    if !cfg.iova_in_range(iova) {
        return out;
    }
    let mut pa = root;
    let mut level = cfg.start_level();
    while let Some(table) = mem.table(pa) {
        let index = cfg.index(iova.get(), level);
        let Some(d) = table.entries.get(index).map(|e| e.load(Ordering::Acquire)) else {
            break;
        };
        out.push(WalkStep {
            level,
            table: pa,
            index,
            descriptor: d,
        });
        if desc::kind(cfg.format(), level, d) != Kind::Table {
            break;
        }
        pa = desc::unpack_pa(d, cfg.granule());
        level += 1;
    }
    out
}

/// Renders every table and leaf of `table`, one line each, with runs of leaves that are
/// contiguous in both IOVA and output address and share attributes collapsed into one line.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot};
/// use iopt_lpae::LpaeTable;
/// use iopt_sim::{SimMemory, debug::render};
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 39, 40))?;
/// let mem = SimMemory::new();
/// let t = LpaeTable::new(cfg, &mem)?;
/// t.map(Iova::new(0x20_0000), PhysAddr::new(0x4000_0000), PageSize::SZ_4K, 300, Prot::READ)?;
/// let text = render(&t);
/// assert!(text.contains("300 x 4K"), "{text}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub fn render(table: &dyn IoPageTable) -> String {
    struct Run {
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        attrs: u64,
        level: u32,
        prot: iopt_api::Prot,
    }
    fn flush(out: &mut String, run: &mut Option<Run>) {
        if let Some(r) = run.take() {
            let _ = writeln!(
                out,
                "{:indent$}leaf L{} {:#x}..{:#x} -> {:#x}  {} x {}  {:?}  attrs {:#x}",
                "",
                r.level,
                r.iova,
                r.iova + r.size * r.count,
                r.pa,
                r.count,
                iopt_api::PageSize::new(r.size)
                    .map_or_else(|| format!("{:#x}", r.size), |s| format!("{s}")),
                r.prot,
                r.attrs,
                indent = 2 * r.level as usize + 2,
            );
        }
    }
    let mut out = String::new();
    let mut run: Option<Run> = None;
    table.walk(&mut |item| match item {
        WalkItem::Table {
            iova,
            level,
            pa,
            live,
        } => {
            flush(&mut out, &mut run);
            let _ = writeln!(
                out,
                "{:indent$}table L{level} at {pa} covering {iova} ({live} live)",
                "",
                indent = 2 * level as usize
            );
        }
        WalkItem::Leaf {
            iova,
            level,
            size,
            pa,
            prot,
            descriptor,
        } => {
            let attrs = descriptor & !desc::ADDR_MASK;
            let extends = run.as_ref().is_some_and(|r| {
                r.level == level
                    && r.attrs == attrs
                    && r.size == size.get()
                    && r.iova + r.size * r.count == iova.get()
                    && r.pa + r.size * r.count == pa.get()
            });
            if extends {
                if let Some(r) = run.as_mut() {
                    r.count += 1;
                }
            } else {
                flush(&mut out, &mut run);
                run = Some(Run {
                    iova: iova.get(),
                    pa: pa.get(),
                    size: size.get(),
                    count: 1,
                    attrs,
                    level,
                    prot,
                });
            }
        }
        _ => {}
    });
    flush(&mut out, &mut run);
    out
}
