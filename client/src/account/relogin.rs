//! After a refused LOGIN (protocol.md 9.3): whether this device's clock or the nonce step
//! the profile keeps can be the cause, from the broker's signed BROKER-INFO; what the second
//! LOGIN proves; and what the profile keeps of it (`clock-offset.json`, `nonce_step`). The
//! decision is sans-IO ([`second_login`], the time passed in); the rest reads and writes the
//! profile on the blocking pool.

use micromsg_wire::ErrorCode;

use crate::link::LinkError;
use crate::profile::{Profile, ProfileInfo};

/// The profile's file that keeps, for its broker, the broker's clock less this device's (in
/// seconds), learned at a login this device's clock made fail: later logins, of any command,
/// are made at the broker's time and do not fail first (each refused LOGIN counts towards the
/// broker's limits on failed logins).
const CLOCK_FILE: &str = "clock-offset.json";

/// What [`CLOCK_FILE`] holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClockOffset {
    broker: String,
    offset: i64,
}

/// The offset the profile keeps for `broker`; 0 when none (or an unreadable file: the next
/// refused login learns it again).
pub(super) fn stored_clock_offset(profile: &Profile, broker: &str) -> i64 {
    std::fs::read(profile.path(CLOCK_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ClockOffset>(&bytes).ok())
        .filter(|kept| kept.broker == broker && kept.offset.unsigned_abs() <= MAX_CLOCK_OFFSET)
        .map_or(0, |kept| kept.offset)
}

/// The largest difference kept (ten years): a file with more is taken as damaged.
const MAX_CLOCK_OFFSET: u64 = 10 * 365 * 86_400;

/// Keeps `offset` for `broker` in the profile (no file for 0), on the blocking pool. A failure
/// only costs the next login a refusal, so it is not an error.
pub(super) async fn store_clock_offset(profile: &Profile, broker: &str, offset: i64) {
    let (profile, broker) = (profile.clone(), broker.to_owned());
    let _ = tokio::task::spawn_blocking(move || write_clock_offset(&profile, broker, offset)).await;
}

/// [`store_clock_offset`]'s write.
fn write_clock_offset(profile: &Profile, broker: String, offset: i64) {
    // Beyond ten years it would be ignored when read: keep none.
    if offset == 0 || offset.unsigned_abs() > MAX_CLOCK_OFFSET {
        let _ = std::fs::remove_file(profile.path(CLOCK_FILE));
        return;
    }
    let kept = ClockOffset { broker, offset };
    if let Ok(json) = serde_json::to_vec(&kept) {
        let _ = profile.write_atomic(CLOCK_FILE, &json, false);
    }
}

/// What BROKER-INFO tells of the broker's LOGIN check.
#[derive(Debug, Clone, Copy)]
pub(super) struct BrokerClock {
    /// Its clock (`TIME`), Unix seconds.
    pub(super) now: u64,
    /// `NONCE-STEP`, seconds.
    pub(super) step: u32,
    /// `NONCE-SKEW`, steps accepted on either side.
    pub(super) skew: u32,
}

/// The second LOGIN after a refused one: at which offset from this device's clock, and with
/// which nonce step.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SecondLogin {
    /// The broker's clock less this device's, when the time the first LOGIN proved is outside
    /// the steps the broker accepts at its own time (its step ± skew, 9.2): log in at the
    /// broker's time, and keep the offset for later logins. `None`: the clock is not the cause
    /// (the offset kept, if any, stays).
    pub(super) offset: Option<i64>,
    /// The broker's `NONCE-STEP`, when it is not the profile's (the operator changed it since
    /// this device registered): log in with it, and keep it in the profile.
    pub(super) step: Option<u32>,
}

/// The second LOGIN after a LOGIN refused for the time `proved_at` (Unix seconds) with the
/// profile's nonce step `profile_step`, from the broker's clock and check, this device's clock
/// (`local_now`) and the whole seconds `waited` from sending the LOGIN to BROKER-INFO's answer
/// (the broker checked the LOGIN at some moment of it, up to `waited` seconds before its
/// `TIME`); `None` when neither the time nor the step can be the cause, and the refusal stands.
///
/// The step the LOGIN proved is taken with the broker's step. The clock can be the cause when,
/// at some moment the broker may have checked it, that step was more than the skew from the
/// broker's: a step boundary passing during the wait must not hide it.
pub(super) fn second_login(
    broker: &BrokerClock,
    waited: u64,
    proved_at: u64,
    local_now: u64,
    profile_step: u32,
) -> Option<SecondLogin> {
    let broker_step = u64::from(broker.step.max(1));
    let skew = u64::from(broker.skew);
    let proved = proved_at / broker_step;
    let earliest = broker.now.saturating_sub(waited) / broker_step;
    let latest = broker.now / broker_step;
    let outside = proved > earliest.saturating_add(skew) || proved.saturating_add(skew) < latest;
    let step = (broker.step != profile_step && broker.step > 0).then_some(broker.step);
    let offset = match outside {
        // A broker clock past i64 cannot be used.
        true => i64::try_from(broker.now)
            .ok()
            .zip(i64::try_from(local_now).ok())
            .map(|(broker, local)| broker - local),
        false => None,
    };
    (offset.is_some() || step.is_some()).then_some(SecondLogin { offset, step })
}

/// Keeps a nonce step learned at a login in the profile, on the blocking pool. The profile is
/// read again first and changed only if it is still the one `info` was read from (a `move`
/// or a port in another process may have rewritten it). As with [`store_clock_offset`], a
/// failure only costs the next login a refusal.
pub(super) async fn store_step(profile: &Profile, info: &ProfileInfo, step: u32) {
    let (profile, info) = (profile.clone(), info.clone());
    let _ = tokio::task::spawn_blocking(move || {
        // Read, checked and written under the lock, so a `move` or `port` in another process
        // is either wholly before (the check sees it) or wholly after (it writes over this).
        let _lock = profile.lock()?;
        let mut now = profile.info()?;
        if (&now.broker, &now.number, now.device) != (&info.broker, &info.number, info.device) {
            return Ok(());
        }
        now.nonce_step = step;
        profile.write_info(&now)
    })
    .await;
}

/// Whether `offset` (seconds) is a clock that is off: a nonce step (`step_secs`) or more.
pub(super) fn clock_is_off(offset: i64, step_secs: u32) -> bool {
    offset.unsigned_abs() >= u64::from(step_secs.max(1))
}

/// What a refused LOGIN is put down to.
pub(super) enum AuthCause {
    /// The LOGIN proved the step the broker's clock is in.
    NotTheClock,
    /// The broker's clock could not be read (BROKER-INFO refused or not answered as such).
    ClockUnknown,
    /// Refused again at the broker's time, this many seconds from this device's.
    NotEvenAtItsTime(i64),
}

/// The AUTH-FAILED refusal of a LOGIN, saying what it means for this device.
pub(super) fn auth_failed(cause: AuthCause, retry_after: Option<u32>) -> LinkError {
    let why = match cause {
        AuthCause::NotTheClock => String::new(),
        AuthCause::ClockUnknown => {
            " (or this device's clock is off: the broker's could not be read to tell)".to_owned()
        }
        AuthCause::NotEvenAtItsTime(offset) => format!(
            " (refused at the broker's time too, {} this device's)",
            clock_difference(offset)
        ),
    };
    LinkError::Refused {
        code: ErrorCode::AuthFailed,
        message: format!(
            "login failed: this device was revoked (`device list` on another device of this \
             entity shows the active ones), or the broker does not know it{why}"
        ),
        retry_after,
    }
}

/// `offset` (the broker's clock less this device's) for people: `95 s ahead of`, `120 s
/// behind`, to be followed by what it is compared with.
fn clock_difference(offset: i64) -> String {
    let side = if offset > 0 { "ahead of" } else { "behind" };
    format!("{} s {side}", offset.unsigned_abs())
}

/// What to tell the user of a login made at the broker's time (`Session::clock_offset`), if
/// anything: this device's clock is off by a nonce step (`step_secs`) or more.
pub fn clock_warning(offset: i64, step_secs: u32) -> Option<String> {
    clock_is_off(offset, step_secs).then(|| {
        format!(
            "this device's clock is off: the broker's is {} it; logging in at the broker's \
             time (set this device's clock right: the time on each message sent comes from it)",
            clock_difference(offset)
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_login_is_made_again_only_when_the_time_proved_or_the_step_can_be_the_cause() {
        let now = 1_800_000_000; // a multiple of 30: each case below is in a known step
        let broker = |at: u64, skew| BrokerClock {
            now: at,
            step: 30,
            skew,
        };
        let again = |offset, step| Some(SecondLogin { offset, step });
        // Proved within the broker's step ± skew: not the cause, whatever the seconds.
        assert_eq!(second_login(&broker(now + 59, 1), 1, now, now, 30), None);
        assert_eq!(second_login(&broker(now - 1, 1), 1, now, now, 30), None);
        // Outside it, either way: log in at the broker's time.
        assert_eq!(
            second_login(&broker(now + 95, 1), 1, now, now, 30),
            again(Some(95), None)
        );
        assert_eq!(
            second_login(&broker(now - 31, 1), 1, now, now, 30),
            again(Some(-31), None)
        );
        // With a skew of 0, a step apart is outside, under a step's seconds.
        assert_eq!(
            second_login(&broker(now + 30, 0), 1, now + 29, now + 29, 30),
            again(Some(1), None)
        );
        assert_eq!(second_login(&broker(now + 29, 0), 1, now, now, 30), None);
        // Refused at the broker's time already (an offset learned before): not the cause.
        assert_eq!(
            second_login(&broker(now + 96, 1), 1, now + 95, now + 1, 30),
            None
        );
        // The clock set right since an earlier correction: log in at about this device's time.
        assert_eq!(
            second_login(&broker(now + 1, 1), 1, now + 95, now, 30),
            again(Some(1), None)
        );
        // The operator changed the step since this device registered: log in with the new
        // one, at this device's time when that is within it.
        assert_eq!(
            second_login(&broker(now + 2, 1), 1, now, now, 6),
            again(None, Some(30))
        );
        assert_eq!(
            second_login(&broker(now + 300, 1), 1, now, now, 6),
            again(Some(300), Some(30))
        );
        // A step of 0 (no broker sends one) is not taken; a clock past i64 cannot be used.
        let zero = BrokerClock {
            now,
            step: 0,
            skew: 1,
        };
        assert_eq!(second_login(&zero, 1, now, now, 30), None);
        assert_eq!(second_login(&broker(u64::MAX, 1), 1, now, now, 30), None);
        // The broker checked the LOGIN before its TIME, and a step boundary may have passed
        // in between: proved at 18 s (step 3 of 6 s), checked at 11 s (step 1: refused), TIME
        // 12 s (step 2, within the skew of 3). The wait keeps the clock as the cause.
        let six = |now| BrokerClock {
            now,
            step: 6,
            skew: 1,
        };
        assert_eq!(second_login(&six(12), 1, 18, 18, 6), again(Some(-6), None));
        assert_eq!(second_login(&six(12), 0, 18, 18, 6), None);
        // The step changed, with a clock past i64: the step is still learned.
        let huge = BrokerClock {
            now: u64::MAX,
            step: 6,
            skew: 1,
        };
        assert_eq!(second_login(&huge, 1, now, now, 30), again(None, Some(6)));
        // Only a step or more is a clock to tell the user about.
        assert!(!clock_is_off(29, 30));
        assert!(clock_is_off(-30, 30));
    }

    #[test]
    fn the_offset_learned_is_kept_in_the_profile_for_its_broker() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        write_clock_offset(&profile, "b:1".into(), -120);
        assert_eq!(stored_clock_offset(&profile, "b:1"), -120);
        // Another broker (the profile moved): its own clock, not yet known.
        assert_eq!(stored_clock_offset(&profile, "c:1"), 0);
        // A clock set right: the file goes.
        write_clock_offset(&profile, "b:1".into(), 0);
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        assert!(!profile.path(CLOCK_FILE).exists());
        // An unreadable file, or one with an offset beyond ten years, counts as none.
        std::fs::write(profile.path(CLOCK_FILE), b"{").unwrap();
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        write_clock_offset(&profile, "b:1".into(), i64::MIN);
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        // One beyond ten years is not kept (it would be ignored when read), and replaces
        // what was.
        write_clock_offset(&profile, "b:1".into(), -120);
        write_clock_offset(&profile, "b:1".into(), 11 * 365 * 86_400);
        assert!(!profile.path(CLOCK_FILE).exists());
    }

    #[tokio::test]
    async fn a_step_learned_while_the_profile_switches_is_not_written_over_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        let old = ProfileInfo::for_tests();
        profile.write_info(&old).unwrap();
        // A `move` or `port` holds the lock while it switches the profile to another broker.
        let switching = profile.lock().unwrap();
        let storing = tokio::spawn({
            let (profile, old) = (profile.clone(), old.clone());
            async move { store_step(&profile, &old, 60).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !storing.is_finished(),
            "the step was stored while the profile was locked"
        );
        let new = ProfileInfo {
            broker: "new.example:7000".into(),
            tls_name: "new.example".into(),
            ..old.clone()
        };
        profile.write_info(&new).unwrap();
        drop(switching);
        storing.await.unwrap();
        // The step was learned for the old broker: it reads the profile again under the lock,
        // sees the switch, and leaves the new account as it is.
        assert_eq!(profile.info().unwrap(), new);
        // Not switched: the step is kept.
        store_step(&profile, &new, 60).await;
        assert_eq!(profile.info().unwrap().nonce_step, 60);
    }

    #[test]
    fn a_refused_login_says_what_it_means_and_keeps_its_code() {
        let refused = auth_failed(AuthCause::NotTheClock, Some(5));
        let text = refused.to_string();
        assert!(text.contains("AUTH-FAILED"), "{text}");
        assert!(text.contains("this device was revoked"), "{text}");
        assert_eq!(refused.code(), Some(ErrorCode::AuthFailed));
        let again = auth_failed(AuthCause::NotEvenAtItsTime(-120), None).to_string();
        assert!(
            again.contains("refused at the broker's time too, 120 s behind this device's)"),
            "{again}"
        );
        let unknown = auth_failed(AuthCause::ClockUnknown, None).to_string();
        assert!(unknown.contains("could not be read"), "{unknown}");
        assert_eq!(clock_warning(0, 30), None);
        assert_eq!(clock_warning(29, 30), None);
        let warning = clock_warning(95, 30).unwrap();
        assert!(
            warning.contains("the broker's is 95 s ahead of it;"),
            "{warning}"
        );
    }
}
