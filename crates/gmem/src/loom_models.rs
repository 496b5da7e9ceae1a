//! Loom models of the freeze protocol (`state`): the FROZEN flag, the SRCU
//! domain, the invalidate lock, the punch sequence and the page-state index,
//! run against a modelled kernel page. The kernel page sits behind a loom
//! mutex, as a real file's pages behind the kernel's own locks: a fault's
//! allocation and a punch may reach the kernel in either order (the fault
//! path takes no lock), and the models check the outcome, the index equal to
//! the kernel's page and nothing changed after `freeze` returned.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p gmem --release --lib loom_`.

use loom::sync::{Arc, Mutex};
use loom::thread;
use srcu::Srcu;

use crate::state::{FileState, Refused};

/// One modelled folio of a file, its kernel page, and the domain.
struct Model {
    domain: Srcu,
    state: FileState,
    /// The folio the model faults and punches.
    folio: u64,
    kernel_page: Mutex<bool>,
}

impl Model {
    /// A file of one folio (a flat index).
    fn new(present: bool) -> Arc<Model> {
        Model::with_file(1, 0, present)
    }

    /// A file of `folios` folios whose folio `folio` is modelled.
    fn with_file(folios: u64, folio: u64, present: bool) -> Arc<Model> {
        let state = FileState::new(folios);
        if present {
            state.record_present(folio);
        }
        Arc::new(Model {
            domain: Srcu::new(),
            state,
            folio,
            kernel_page: Mutex::new(present),
        })
    }

    /// The fault path's slow half, allocating the modelled page.
    fn fault(&self) -> Result<bool, Refused<()>> {
        self.state.fault(&self.domain, self.folio, |_| {
            *self.kernel_page.lock().expect("kernel page") = true;
            Ok(())
        })
    }

    fn punch(&self) -> Result<(), Refused<()>> {
        self.state
            .punch_range(&self.domain, self.folio..self.folio + 1, || {
                *self.kernel_page.lock().expect("kernel page") = false;
                Ok(())
            })
    }

    /// The kernel's truth.
    fn kernel_has_page(&self) -> bool {
        *self.kernel_page.lock().expect("kernel page")
    }

    fn index_has_page(&self) -> bool {
        self.state.index().contains(self.folio)
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
        assert_eq!(model.index_has_page(), at_freeze);
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
        assert_eq!(model.index_has_page(), at_freeze);
        assert_eq!(result.is_ok(), !at_freeze);
    });
}

/// A fault (lock-free) racing a punch of its folio: whichever order their
/// kernel calls take, the index ends equal to the kernel page.
fn fault_races_punch(model: Arc<Model>) {
    let started_present = model.index_has_page();
    let faulter = {
        let model = model.clone();
        thread::spawn(move || model.fault())
    };
    model.punch().expect("not frozen");
    let allocated = faulter.join().expect("faulter").expect("not frozen");
    assert_eq!(model.index_has_page(), model.kernel_has_page());
    // A fault on an absent folio records it, even when it had to redo the
    // allocation after an overlapping punch.
    assert!(
        allocated || started_present,
        "an allocating fault said it did not"
    );
}

#[test]
fn loom_fault_races_punch_index_stays_exact() {
    loom::model(|| fault_races_punch(Model::new(false)));
}

#[test]
fn loom_fault_races_punch_over_a_leaf_not_yet_made() {
    // A file of two leaves whose second leaf does not exist yet: the fault
    // installs it while the punch walks the range, so the punch meets the
    // fault on the child slot, not on a bit word.
    loom::model(|| fault_races_punch(Model::with_file(1024, 600, false)));
}

#[test]
fn loom_fault_races_punch_of_a_present_folio() {
    // The folio is present: a fault that still sees it returns at once; one
    // that sees it punched allocates it again.
    loom::model(|| fault_races_punch(Model::new(true)));
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
        assert_eq!(model.index_has_page(), model.kernel_has_page());
    });
}
