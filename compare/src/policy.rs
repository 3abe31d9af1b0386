//! How each design's users drive it: the one place where the two designs are treated
//! differently. Everything else in the harness calls the same [`Reserve`](iopt_api::Reserve)
//! trait the same way.
//!
//! | decision | Design 1 (panthor, msm) | Design 2 (nouveau's raw get/put) |
//! |---|---|---|
//! | what a map's submit reserves | one pool for the bind's range, counted for leaves of the smallest page size (the worst case for an empty tree) | the bind's range with the largest page size the map will use, so the table installs exactly the tables the map's leaves need |
//! | when that reservation goes | when the bind completes (the unused rest returns) | when the unmap that removes the mapping completes (or when the map bind completes, if its map failed or never ran) |
//! | how an unmap is cut into calls | as the iommu core does: the largest page size the IOVA's alignment allows (a 2 MiB unmap over a table of 4 KiB leaves removes the table) | by the size of the leaves found there, which is what was mapped (nouveau unmaps with the page size it reserved with) |
//! | an in-flight cap refuses a reservation | the submitter waits: the oldest queued binds execute and complete until it is admitted (msm) | no cap |

use iopt_api::{Config, IoPageTable, Iova, IovaRange, PageSize, PageSizes};

use serde::Serialize;

/// The driving policy of a design's users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Policy {
    /// Design 1: per-bind worst-case pools, released at completion.
    PerBind,
    /// Design 2: per-mapping VA reservations, released when the unmap completes.
    PerMapping,
}

/// A run of equal-sized leaves a map is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First IOVA.
    pub iova: u64,
    /// First PA (0 for unmaps).
    pub pa: u64,
    /// Page size.
    pub size: u64,
    /// Pages.
    pub count: u64,
}

impl Piece {
    /// Bytes the piece covers.
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.size * self.count
    }

    /// Always `false`: a piece holds at least one page.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }
}

/// Cuts `[iova, iova + len)` → `pa` into runs of the largest usable page sizes, as the Linux
/// iommu core (`iommu_pgsize`) and panthor's scatterlist walk do. Returns `None` when some
/// part fits no page size (misaligned addresses or length).
#[must_use]
pub fn split(sizes: PageSizes, iova: u64, pa: u64, len: u64) -> Option<Vec<Piece>> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let (i, p) = (iova.checked_add(done)?, pa.checked_add(done)?);
        let (size, count) = sizes.best_fit(i, p, len - done)?;
        out.push(Piece {
            iova: i,
            pa: p,
            size: size.get(),
            count,
        });
        done += size.get() * count;
    }
    Some(out)
}

impl Policy {
    /// Returns the name of the design this policy drives.
    #[must_use]
    pub const fn design(self) -> &'static str {
        match self {
            Policy::PerBind => "Design 1",
            Policy::PerMapping => "Design 2",
        }
    }

    /// The reservation a map bind's submit makes: `(range, leaf size)`, given the pieces the
    /// map will be cut into. `None` when the bind's range is not page-aligned (the driver
    /// refuses such a bind before reserving anything).
    ///
    /// Design 1 counts for the smallest page size (panthor's worst case); Design 2 passes the
    /// largest page size the pieces use, and the table plans leaves as the map will place them.
    #[must_use]
    pub fn reservation(
        self,
        cfg: &Config,
        va: u64,
        size: u64,
        pieces: &[Piece],
    ) -> Option<(IovaRange, PageSize)> {
        let smallest = cfg.page_sizes().smallest()?;
        let range = IovaRange::new(Iova::new(va), size, smallest.get()).ok()?;
        let leaf = match self {
            Policy::PerBind => smallest,
            Policy::PerMapping => PageSize::new(pieces.iter().map(|p| p.size).max()?)?,
        };
        Some((range, leaf))
    }

    /// Cuts an unmap of `[va, va + len)` into calls. Design 2 looks the leaves up in `table`
    /// (its software walk); where nothing usable is mapped it issues the smallest page size,
    /// which the table refuses with the error the caller should see.
    #[must_use]
    pub fn unmap_pieces<T: IoPageTable + ?Sized>(
        self,
        table: &T,
        va: u64,
        len: u64,
    ) -> Option<Vec<Piece>> {
        let sizes = table.config().page_sizes();
        match self {
            Policy::PerBind => split(sizes, va, va, len),
            Policy::PerMapping => {
                let smallest = sizes.smallest()?.get();
                if va % smallest != 0 || len % smallest != 0 {
                    return None;
                }
                let end = va.checked_add(len)?;
                let mut out: Vec<Piece> = Vec::new();
                let mut at = va;
                while at < end {
                    let size = table
                        .iova_to_phys(Iova::new(at))
                        .map(|t| t.size.get())
                        .filter(|&s| at % s == 0 && at + s <= end)
                        .unwrap_or(smallest);
                    match out.last_mut() {
                        Some(p) if p.size == size && p.iova + p.len() == at => p.count += 1,
                        _ => out.push(Piece {
                            iova: at,
                            pa: 0,
                            size,
                            count: 1,
                        }),
                    }
                    at += size;
                }
                Some(out)
            }
        }
    }

    /// Whether an in-flight cap refusal makes the submitter wait for older binds.
    #[must_use]
    pub const fn waits_on_cap(self) -> bool {
        matches!(self, Policy::PerBind)
    }
}
