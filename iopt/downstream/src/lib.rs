//! A stand-in for a driver crate: it binds buffers through `iopt` and never names a design.
//! Which design it gets is decided by its feature list alone (`alloc-ops` or `prealloc`).

use iopt::{
    AllocError, Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, MapError,
    PageSize, PageSizes, PhysAddr, Prot, ReleaseError, Reserve, ReserveError, Table, UnmapError,
};
use iopt_sim::SimMemory;

/// What the driver's VM holds.
#[derive(Debug)]
pub struct Vm<'m> {
    table: Table<&'m SimMemory>,
}

/// Anything a bind can fail with.
#[derive(Debug)]
pub enum BindError {
    /// Building the table failed.
    Alloc(AllocError),
    /// Reserving failed.
    Reserve(ReserveError),
    /// Mapping failed.
    Map(MapError),
    /// Unmapping failed.
    Unmap(UnmapError),
    /// Releasing failed; the error gives the reservation back.
    Release(ReleaseError),
}

impl<'m> Vm<'m> {
    /// Creates a panthor-like VM: 64-bit stage 1, 4K granule, 48-bit VA, 40-bit PA.
    ///
    /// # Errors
    ///
    /// [`BindError::Alloc`] when the root cannot be allocated.
    ///
    /// # Panics
    ///
    /// Never: the configuration is valid.
    pub fn new(mem: &'m SimMemory) -> Result<Self, BindError> {
        let cfg = Config::new(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::GRANULE_4K,
            48,
            40,
        ))
        .expect("valid configuration");
        Ok(Self {
            table: Table::new(cfg, mem).map_err(BindError::Alloc)?,
        })
    }

    /// Returns the table.
    #[must_use]
    pub fn table(&self) -> &Table<&'m SimMemory> {
        &self.table
    }

    /// Binds `pages` 4 KiB pages at `va` to `pa` the asynchronous way: reserve, map without
    /// allocating, keep the reservation until the unbind.
    ///
    /// # Errors
    ///
    /// The reservation's or the map's error.
    pub fn bind(&self, va: u64, pa: u64, pages: u64) -> Result<iopt::Reservation, BindError> {
        let range = IovaRange::new(Iova::new(va), pages * 4096, 4096)
            .map_err(|e| BindError::Reserve(e.into()))?;
        let res = self
            .table
            .reserve(range, PageSize::SZ_4K)
            .map_err(BindError::Reserve)?;
        self.table
            .map_reserved(
                &res,
                Iova::new(va),
                PhysAddr::new(pa),
                PageSize::SZ_4K,
                pages,
                Prot::READ | Prot::WRITE,
            )
            .map_err(BindError::Map)?;
        Ok(res)
    }

    /// Unbinds what [`bind`](Self::bind) bound and releases its reservation.
    ///
    /// # Errors
    ///
    /// The unmap's or the release's error.
    pub fn unbind(&self, res: iopt::Reservation) -> Result<(), BindError> {
        let mut gather = Gather::new();
        let range = res.range();
        self.table
            .unmap(
                range.start(),
                PageSize::SZ_4K,
                range.len() / 4096,
                &mut gather,
            )
            .map_err(BindError::Unmap)?;
        self.table
            .release(res, &mut gather)
            .map_err(BindError::Release)
    }
}
