//! Every checker can fail: deliberately broken backends (built around the real ones in
//! `iopt_checkers::broken`) are caught within seconds, and the very input that caught each
//! passes on the real backend.

use arbitrary::{Arbitrary, Unstructured};
use iopt_checkers::broken::{self, Bug};
use iopt_checkers::config::{self, ConfigCase};
use iopt_checkers::descriptor::{self, DescInput};
use iopt_checkers::differential;
use iopt_checkers::faults::{self, FaultInput};
use iopt_checkers::input::DiffInput;
use iopt_checkers::lane::{Design, LaneSpec};
use iopt_checkers::search::{Hunt, hunt};
use std::time::Duration;

const BUDGET: Duration = Duration::from_secs(30);

fn caught(what: &str, h: &Hunt) -> Vec<u8> {
    let Some((f, data)) = &h.found else {
        panic!(
            "{what}: not caught in {} inputs ({:?})",
            h.inputs, h.elapsed
        );
    };
    eprintln!(
        "{what}: caught after {} input(s) in {:?}:\n{}",
        h.inputs, h.elapsed, f.what
    );
    data.clone()
}

fn diff_hunt(what: &str, seed: u64, lane: impl Fn() -> LaneSpec) {
    let h = hunt(seed, BUDGET, |u| {
        let input = DiffInput::arbitrary(u)?;
        Ok(differential::check_with(&input, &[lane()]))
    });
    let data = caught(what, &h);
    // The same input on the real designs passes.
    let input = DiffInput::arbitrary(&mut Unstructured::new(&data)).expect("decodes");
    if let Err(f) = differential::check(&input) {
        panic!("{what}: the catching input fails on the real designs too:\n{f}");
    }
}

#[test]
fn index_off_by_one_is_caught_by_the_differential_checker() {
    diff_hunt("Design 1, leaf index 7 stored at 8", 1, || {
        broken::tampered(Design::D1, Bug::IndexOffByOne)
    });
    diff_hunt("Design 2, leaf index 7 stored at 8", 2, || {
        broken::tampered(Design::D2, Bug::IndexOffByOne)
    });
}

#[test]
fn a_dropped_free_is_caught_as_a_leak() {
    diff_hunt("Design 1, a free dropped", 3, || broken::leaky(Design::D1));
    diff_hunt("Design 2, a free dropped", 4, || broken::leaky(Design::D2));
}

#[test]
fn a_missing_walk_flush_is_caught_by_the_device() {
    diff_hunt("Design 1, no flush_walk", 5, || {
        broken::no_walk_flush(Design::D1)
    });
    diff_hunt("Design 2, no flush_walk", 6, || {
        broken::no_walk_flush(Design::D2)
    });
}

#[test]
fn a_leaf_left_out_of_the_gather_is_caught_by_the_device() {
    diff_hunt("Design 1, no add_page", 7, || broken::no_gather(Design::D1));
    diff_hunt("Design 2, no add_page", 8, || broken::no_gather(Design::D2));
}

#[test]
fn a_map_that_is_not_all_or_nothing_under_failure_is_caught_by_the_fault_checker() {
    for (seed, design) in [(9, Design::D1), (10, Design::D2)] {
        let lane = || broken::tampered(design, Bug::PartialMapOnOom);
        let h = hunt(seed, BUDGET, |u| {
            let input = FaultInput::arbitrary(u)?;
            Ok(faults::check_with(&input, &[lane()]))
        });
        let data = caught(&format!("{design:?}, partial map on failure"), &h);
        let input = FaultInput::arbitrary(&mut Unstructured::new(&data)).expect("decodes");
        if let Err(f) = faults::check(&input) {
            panic!("the catching input fails on the real designs too:\n{f}");
        }
    }
}

#[test]
fn a_wrong_register_field_is_caught_by_the_config_checker() {
    let build = broken::tampered_build(Design::D2, Bug::RegisterTsz);
    let h = hunt(11, BUDGET, |u| {
        let case = ConfigCase::arbitrary(u)?;
        Ok(config::check_with(&case, build.as_ref()))
    });
    let data = caught("T0SZ off by one", &h);
    let case = ConfigCase::arbitrary(&mut Unstructured::new(&data)).expect("decodes");
    config::check(&case).expect("the real designs pass");
}

#[test]
fn a_broken_decoder_is_caught_by_the_descriptor_checker() {
    let h = hunt(12, BUDGET, |u| {
        let input = DescInput::arbitrary(u)?;
        Ok(descriptor::check_with(&input, &broken::BrokenCodec))
    });
    let data = caught("64 KiB fold forgotten", &h);
    let input = DescInput::arbitrary(&mut Unstructured::new(&data)).expect("decodes");
    descriptor::check(&input).expect("the real codec passes");
}
