//! `DirtyBitmap` is total: any window that fits the 64-bit space, the top page included, and
//! any record, with bad parameters refused when the bitmap is made.

use iopt_api::{BitmapError, DirtyBitmap, DirtySink, Iova};

/// A TTBR1 window: the last 64 pages of the address space.
#[test]
fn records_at_the_top_of_the_address_space() {
    let base = u64::MAX - (64 << 12) + 1;
    let mut b = DirtyBitmap::new(Iova::new(base), 12, 64).unwrap();
    // The last page, by a record that ends exactly at 2^64 and one that would pass it.
    b.record(Iova::new(u64::MAX - 0xfff), 0x1000);
    b.record(Iova::new(u64::MAX - 0x1fff), u64::MAX);
    b.record(Iova::new(u64::MAX), 1);
    let got: Vec<_> = b.dirty_pages().collect();
    assert_eq!(
        got,
        vec![Iova::new(u64::MAX - 0x1fff), Iova::new(u64::MAX - 0xfff)]
    );
    assert!(b.is_dirty(Iova::new(u64::MAX)));
    assert!(!b.is_dirty(Iova::new(base)));
}

#[test]
fn a_page_shift_of_64_is_refused() {
    for page_shift in [64, 65, u32::MAX] {
        assert_eq!(
            DirtyBitmap::new(Iova::new(0), page_shift, 1),
            Err(BitmapError::PageShift { page_shift })
        );
    }
    // 63 is the widest page there is: two of them cover the whole space.
    let mut b = DirtyBitmap::new(Iova::new(0), 63, 2).unwrap();
    b.record(Iova::new(u64::MAX), 1);
    assert_eq!(
        b.dirty_pages().collect::<Vec<_>>(),
        vec![Iova::new(1 << 63)]
    );
}

#[test]
fn a_window_past_the_top_is_refused() {
    let base = Iova::new(u64::MAX - 0xfff);
    assert!(DirtyBitmap::new(base, 12, 1).is_ok());
    assert_eq!(
        DirtyBitmap::new(base, 12, 2),
        Err(BitmapError::Window {
            base,
            page_shift: 12,
            pages: 2
        })
    );
    assert!(matches!(
        DirtyBitmap::new(Iova::new(0), 0, u64::MAX),
        Err(BitmapError::Alloc { .. })
    ));
}

/// Records of every shape against a model in 128 bits, at the bottom and the top of the space.
#[test]
fn records_match_a_wide_model() {
    for base in [0u64, 0x10_0000, u64::MAX - (8 << 12) + 1] {
        for pages in [0u64, 1, 7, 8] {
            let Ok(b) = DirtyBitmap::new(Iova::new(base), 12, pages) else {
                continue;
            };
            let probes = [0u64, 1, 0xfff, 0x1000, 0x1fff, 0x7fff, 0x8000];
            for &off in &probes {
                for len in [0u64, 1, 0x1000, 0x1001, 0x3000, u64::MAX] {
                    let iova = base.wrapping_add(off).wrapping_sub(0x800);
                    let mut b = b.clone();
                    b.record(Iova::new(iova), len);
                    let lo = u128::from(iova);
                    let hi = (lo + u128::from(len)).min(1 << 64);
                    let want: Vec<Iova> = (0..pages)
                        .map(|p| u128::from(base) + (u128::from(p) << 12))
                        .filter(|&s| len > 0 && s < hi && s + 0x1000 > lo)
                        .map(|s| Iova::new(s as u64))
                        .collect();
                    assert_eq!(
                        b.dirty_pages().collect::<Vec<_>>(),
                        want,
                        "base {base:#x} pages {pages} iova {iova:#x} len {len:#x}"
                    );
                }
            }
        }
    }
}
