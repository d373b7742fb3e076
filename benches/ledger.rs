//! The hot pure code: burn-down over a user's grants. A deduct plans its allocations over the
//! wallet's grants in burn order and applies them; a refund gives them back.

use chrono::{Duration, TimeZone, Utc};
use credits_engine::domain::{
    self, Balance, Credits, Grant, GrantStatus, UserPackageId, plan_deduction,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// `count` limited grants of 10 credits each, every third one expiring, in burn order.
fn grants(count: i64) -> Vec<Grant> {
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut grants: Vec<Grant> = (0..count)
        .map(|n| Grant {
            id: UserPackageId(n + 1),
            priority: i32::try_from(n % 5).unwrap(),
            expires_at: (n % 3 == 0).then(|| start + Duration::days(30 + n)),
            status: GrantStatus::Active,
            balance: Balance::Limited {
                total: Credits::new(10).unwrap(),
                used: Credits::ZERO,
                remaining: Credits::new(10).unwrap(),
                expired: Credits::ZERO,
            },
        })
        .collect();
    domain::sort_burn_order(&mut grants);
    grants
}

fn burn_down(c: &mut Criterion) {
    let now = Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap();
    let mut group = c.benchmark_group("burn_down");
    for count in [1_i64, 10, 100, 1_000] {
        group.throughput(Throughput::Elements(1));
        // A cost that drains about half of the grants: the plan walks across many of them.
        let cost = Credits::new((count * 10 / 2).max(1)).unwrap();
        let mut wallet = grants(count);
        group.bench_with_input(
            BenchmarkId::new("plan_apply_restore", count),
            &cost,
            |b, &cost| {
                b.iter(|| {
                    let allocations = plan_deduction(black_box(&wallet), cost, now)
                        .expect("the grants cover the cost");
                    domain::apply_deduction(&mut wallet, &allocations);
                    // Give it back, so every iteration plans over the same balances.
                    domain::restore(&mut wallet, &allocations);
                    allocations.len()
                });
            },
        );
        // The common case: a small cost paid by the first grant.
        group.bench_with_input(
            BenchmarkId::new("plan_small_cost", count),
            &count,
            |b, _| {
                b.iter(|| plan_deduction(black_box(&wallet), Credits::new(1).unwrap(), now));
            },
        );
        group.bench_with_input(BenchmarkId::new("totals", count), &count, |b, _| {
            b.iter(|| domain::totals(black_box(&wallet), now));
        });
    }
    group.finish();
}

criterion_group!(benches, burn_down);
criterion_main!(benches);
