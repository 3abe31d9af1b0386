//! Exhaustive fault injection: for every workload and design, the k-th page allocation fails,
//! for every k the clean run made; each time a typed error, nothing changed (walk items and
//! the allocator's live set compared whole), the retried operation succeeds, the workload ends
//! in the clean run's shape, and no page leaks.

use iopt_checkers::lane::{Design, LaneSpec};
use iopt_checkers::workloads::{self, exhaustive};

#[test]
fn every_allocation_of_every_workload_fails_once_and_nothing_is_lost() {
    let designs = [
        ("Design 1", Design::D1, false),
        ("Design 1, eager free", Design::D1_EAGER, false),
        ("Design 2", Design::D2, false),
        ("Design 2, exclusive", Design::D2, true),
    ];
    let mut total = 0;
    let mut lines = Vec::new();
    for (name, steps) in workloads::all() {
        for (dname, design, exclusive) in designs {
            let spec = LaneSpec::real(dname, design);
            let spec = if exclusive { spec.exclusive() } else { spec };
            let tally = match exhaustive(&steps, &spec) {
                Ok(t) => t,
                Err(f) => panic!("workload {name}, {dname}:\n{f}"),
            };
            assert!(tally.points > 0, "{name} on {dname} allocates nothing");
            assert_eq!(
                tally.hits, tally.points,
                "{name} on {dname}: every injection met once"
            );
            total += tally.points;
            lines.push(format!(
                "  {name:24} {dname:22} {:4} injection points",
                tally.points
            ));
        }
    }
    println!("exhaustive fault injection:\n{}", lines.join("\n"));
    println!("fault-injection points exercised: {total}");
    eprintln!("fault-injection points exercised: {total}");
}
