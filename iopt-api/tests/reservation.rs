//! Reservation handles: the bounds check against a 128-bit model, and what a handle reveals.

use iopt_api::{Iova, IovaRange, Issuer, PageSize};
use proptest::prelude::*;
use std::hash::BuildHasher;

/// The bounds check written the obvious way, in 128 bits: `iova` inside the range, and the
/// run's end not past it (so a zero-leaf run is inside exactly where `iova` is).
fn model(range: IovaRange, iova: u64, size: u64, count: u64) -> bool {
    let first = u128::from(range.start().get());
    let end = first + u128::from(range.len());
    let i = u128::from(iova);
    first <= i && i < end && i + u128::from(count) * u128::from(size) <= end
}

fn sizes() -> impl Strategy<Value = PageSize> {
    prop::sample::select(vec![
        PageSize::SZ_4K,
        PageSize::SZ_16K,
        PageSize::SZ_64K,
        PageSize::SZ_2M,
        PageSize::SZ_1G,
    ])
}

/// A range (low, or ending at the top of the address space) and an IOVA near one of the
/// edges that matter: its start, its end, 0, the top; or anywhere.
fn range_and_iova() -> impl Strategy<Value = (IovaRange, u64)> {
    (1u64..1 << 20, 1u64..1 << 20, any::<bool>())
        .prop_map(|(first, pages, top)| {
            let len = pages << 12;
            let start = if top {
                0u64.wrapping_sub(len)
            } else {
                first << 12
            };
            IovaRange::new(Iova::new(start), len, 0x1000).unwrap()
        })
        .prop_flat_map(|r| {
            let (s, e) = (r.start().get(), r.start().get().wrapping_add(r.len()));
            let iova = prop_oneof![
                prop::sample::select(vec![s, e, 0, u64::MAX - 0xfff]),
                (-0x4000i64..0x4000).prop_map(move |d| s.wrapping_add_signed(d) & !0xfff),
                (-0x4000i64..0x4000).prop_map(move |d| e.wrapping_add_signed(d) & !0xfff),
                any::<u64>(),
            ];
            (Just(r), iova)
        })
}

proptest! {
    #[test]
    fn holds_agrees_with_the_model(
        (range, iova) in range_and_iova(),
        size in sizes(),
        count in prop_oneof![0u64..4, 1u64..1 << 20, any::<u64>()],
    ) {
        let r = Issuer::new(1).issue(1, range, size, 0, 0);
        prop_assert_eq!(
            r.holds(Iova::new(iova), size, count),
            model(range, iova, size.get(), count),
            "{:?} iova {:#x} size {:#x} count {}", range, iova, size.get(), count
        );
    }
}

#[test]
fn holds_at_the_top_of_the_address_space() {
    let top = IovaRange::new(Iova::new(u64::MAX - 0xf_ffff), 0x10_0000, 0x1000).unwrap();
    let r = Issuer::new(1).issue(1, top, PageSize::SZ_4K, 0, 0);
    assert!(r.holds(Iova::new(u64::MAX - 0xf_ffff), PageSize::SZ_4K, 256));
    assert!(!r.holds(Iova::new(u64::MAX - 0xf_ffff), PageSize::SZ_4K, 257));
    assert!(r.holds(Iova::new(u64::MAX - 0xfff), PageSize::SZ_4K, 1));
    assert!(!r.holds(Iova::new(u64::MAX - 0xfff), PageSize::SZ_4K, 2));
    assert!(!r.holds(Iova::new(0), PageSize::SZ_4K, 1));
    assert!(!r.holds(Iova::new(u64::MAX - 0xf_ffff), PageSize::SZ_4K, u64::MAX));
}

/// A run of no leaves lies inside exactly where its IOVA does: not at the range's end.
#[test]
fn an_empty_run_is_inside_where_its_iova_is() {
    let range = IovaRange::new(Iova::new(0x1000), 0x1000, 0x1000).unwrap();
    let r = Issuer::new(1).issue(1, range, PageSize::SZ_4K, 0, 0);
    assert!(r.holds(Iova::new(0x1000), PageSize::SZ_4K, 0));
    assert!(!r.holds(Iova::new(0x2000), PageSize::SZ_4K, 0));
    assert!(!r.holds(Iova::new(0), PageSize::SZ_4K, 0));
}

#[test]
fn an_issuer_knows_its_own_handles_only() {
    let range = IovaRange::new(Iova::new(0x4000_0000), 0x20_0000, 0x1000).unwrap();
    let a = Issuer::new(3);
    let b = Issuer::new(3); // same table id, another key
    let mine = a.issue(9, range, PageSize::SZ_4K, 2, 5);
    let copy = b.issue(9, range, PageSize::SZ_4K, 2, 5);
    assert_eq!(a.word(&mine), Some(5));
    assert_eq!(a.word(&copy), None);
    assert_eq!(b.word(&copy), Some(5));
    assert_eq!(b.word(&mine), None);
    assert_ne!(mine, copy, "the key is part of equality");
    assert_eq!(
        format!("{mine:?}"),
        format!("{copy:?}"),
        "Debug shows no key"
    );
    // Hash sees the identity only: the copy hashes alike, so no hasher learns the key.
    let s = std::collections::hash_map::RandomState::new();
    assert_eq!(s.hash_one(&mine), s.hash_one(&copy));
    assert_eq!(format!("{a:?}"), "Issuer(table 3)");
}
