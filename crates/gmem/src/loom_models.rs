//! Loom models of the freeze protocol (`state`): the FROZEN flag, the SRCU
//! domain, the invalidate lock and the page-state index, run against a
//! modelled kernel page. The kernel page is a `loom::cell::UnsafeCell`, so
//! loom also reports any kernel call that is not ordered after the ones it
//! must follow (an allocation not waited for by `freeze`, a fault and a
//! punch not serialised by the invalidate lock).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p gmem --release --lib loom_`.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use srcu::Srcu;

use crate::state::{FileState, Refused};

/// One file of one folio, its kernel page, and the domain.
struct Model {
    domain: Srcu,
    state: FileState,
    kernel_page: UnsafeCell<bool>,
}

impl Model {
    fn new(present: bool) -> Arc<Model> {
        let state = FileState::new(1);
        if present {
            state.record_present(0);
        }
        Arc::new(Model {
            domain: Srcu::new(),
            state,
            kernel_page: UnsafeCell::new(present),
        })
    }

    /// The fault path's slow half, allocating the modelled page.
    fn fault(&self) -> Result<bool, Refused<()>> {
        self.state.fault(&self.domain, 0, |_| {
            // SAFETY: loom checks that this write is ordered with every
            // other access to the modelled page.
            self.kernel_page.with_mut(|page| unsafe { *page = true });
            Ok(())
        })
    }

    fn punch(&self) -> Result<(), Refused<()>> {
        self.state.punch_range(&self.domain, 0..1, || {
            // SAFETY: as in `fault`.
            self.kernel_page.with_mut(|page| unsafe { *page = false });
            Ok(())
        })
    }

    /// The kernel's truth; loom reports a read not ordered after a write.
    fn kernel_has_page(&self) -> bool {
        // SAFETY: as in `fault`.
        self.kernel_page.with(|page| unsafe { *page })
    }
}

#[test]
fn loom_allocation_races_freeze() {
    // Either the fault finished before freeze returned (and the freezer sees
    // its page), or it saw FROZEN and allocated nothing.
    loom::model(|| {
        let model = Model::new(false);
        let faulter = {
            let model = model.clone();
            thread::spawn(move || model.fault())
        };
        assert!(!model.state.freeze(&model.domain));
        let at_freeze = model.kernel_has_page();
        let result = faulter.join().expect("faulter");
        assert_eq!(
            model.kernel_has_page(),
            at_freeze,
            "allocated after freeze returned"
        );
        assert_eq!(model.state.index().contains(0), at_freeze);
        match result {
            Ok(allocated) => assert!(allocated && at_freeze),
            Err(refused) => assert!(refused == Refused::Frozen && !at_freeze),
        }
    });
}

#[test]
fn loom_punch_races_freeze() {
    // A punch either completed before freeze returned or was refused.
    loom::model(|| {
        let model = Model::new(true);
        let puncher = {
            let model = model.clone();
            thread::spawn(move || model.punch())
        };
        model.state.freeze(&model.domain);
        let at_freeze = model.kernel_has_page();
        let result = puncher.join().expect("puncher");
        assert_eq!(
            model.kernel_has_page(),
            at_freeze,
            "punched after freeze returned"
        );
        assert_eq!(model.state.index().contains(0), at_freeze);
        assert_eq!(result.is_ok(), !at_freeze);
    });
}

#[test]
fn loom_fault_races_punch_index_stays_exact() {
    // The invalidate lock serialises the kernel calls (loom reports the
    // race otherwise) and the index ends equal to the kernel page.
    loom::model(|| {
        let model = Model::new(false);
        let faulter = {
            let model = model.clone();
            thread::spawn(move || model.fault())
        };
        model.punch().expect("not frozen");
        faulter.join().expect("faulter").expect("not frozen");
        assert_eq!(model.state.index().contains(0), model.kernel_has_page());
    });
}

#[test]
fn loom_unfreeze_needs_no_grace_period() {
    // A fault racing unfreeze either fails harmlessly with EPERM or
    // allocates; in both cases the index matches the kernel.
    loom::model(|| {
        let model = Model::new(false);
        model.state.freeze(&model.domain);
        let faulter = {
            let model = model.clone();
            thread::spawn(move || model.fault())
        };
        assert!(model.state.unfreeze());
        let result = faulter.join().expect("faulter");
        assert_eq!(result.is_ok(), model.kernel_has_page());
        assert_eq!(model.state.index().contains(0), model.kernel_has_page());
    });
}
