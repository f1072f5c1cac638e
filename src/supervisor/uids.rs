//! The run uids of level `full`: a block of uids of which each running run
//! holds one, taken when it is handed to the starter and given back only
//! when it has settled (nothing of it alive, its folder gone), so a uid is
//! never shared by two runs. Allocation goes round the block, so a uid
//! that was just given back is the last to be handed out again.

use std::collections::HashSet;

pub(crate) struct UidPool {
    base: u32,
    count: u32,
    /// Offset of the next uid to try.
    next: u32,
    in_use: HashSet<u32>,
}

impl UidPool {
    pub fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            base,
            count,
            next: 0,
            in_use: HashSet::new(),
        }
    }

    /// A free uid, or `None` when every one is held (the configuration
    /// keeps `count` above `max_running`, so only runs being put down after
    /// a restart can fill the rest).
    pub fn take(&mut self) -> Option<u32> {
        for _ in 0..self.count {
            let uid = self.base + self.next;
            self.next = (self.next + 1) % self.count;
            if self.in_use.insert(uid) {
                return Some(uid);
            }
        }
        None
    }

    /// Marks `uid` held (a run found alive after a restart). Uids outside
    /// the block (another configuration's) are not ours to track.
    pub fn hold(&mut self, uid: u32) -> bool {
        self.contains(uid) && self.in_use.insert(uid)
    }

    pub fn release(&mut self, uid: u32) {
        self.in_use.remove(&uid);
    }

    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }

    pub fn range(&self) -> (u32, u32) {
        (self.base, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_never_handed_out_twice_while_held() {
        let mut p = UidPool::new(1000, 3);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        let c = p.take().unwrap();
        assert_eq!(p.take(), None);
        assert_eq!([a, b, c], [1000, 1001, 1002]);
        p.release(b);
        assert_eq!(p.take(), Some(1001));
        assert!(!p.hold(1000), "1000 is already held");
        p.release(1000);
        assert!(p.hold(1000));
        assert!(!p.hold(5), "outside the block");
    }

    #[test]
    fn allocation_goes_round_the_block() {
        let mut p = UidPool::new(10, 4);
        let a = p.take().unwrap();
        p.release(a);
        // The uid just given back comes last.
        assert_eq!(p.take(), Some(11));
        assert_eq!(p.take(), Some(12));
        assert_eq!(p.take(), Some(13));
        assert_eq!(p.take(), Some(10));
    }
}
