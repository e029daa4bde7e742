//! The login nonce: the skew window and everything the nonce is bound to.

use micromsg_crypto::Secret32;
use micromsg_crypto::nonce::{
    self, Direction, NonceContext, NonceError, NoncePolicy, TLS_EXPORTER_LABEL,
};
use proptest::prelude::*;

#[test]
fn exporter_label() {
    assert_eq!(TLS_EXPORTER_LABEL, b"EXPORTER-micromsg-login-v1");
}

proptest! {
    #[test]
    fn window_and_bindings(
        secret in any::<[u8; 32]>(),
        entity in "[0-9]{1,20}",
        device in any::<u32>(),
        binding in any::<[u8; 32]>(),
        other_binding in any::<[u8; 32]>(),
        now in 1_000u64..u64::MAX / 2,
        step in 1u64..120,
    ) {
        prop_assume!(binding != other_binding);
        let secret = Secret32::from_bytes(secret);
        let ctx = NonceContext { entity: &entity, device, binding: &binding };
        let policy = NoncePolicy { step_secs: step, skew_steps: 1 };
        let t = now / step;
        prop_assume!(t >= 2);
        let dir = Direction::ClientToBroker;
        let verify = |ctx: &NonceContext<'_>, dir, presented: &[u8]| {
            nonce::verify(&secret, dir, ctx, &policy, now, presented)
        };

        for candidate in [t - 1, t, t + 1] {
            let n = nonce::compute(&secret, dir, &ctx, candidate).unwrap();
            prop_assert_eq!(verify(&ctx, dir, &n), Ok(candidate));
        }
        for outside in [t - 2, t + 2] {
            let n = nonce::compute(&secret, dir, &ctx, outside).unwrap();
            prop_assert_eq!(verify(&ctx, dir, &n), Err(NonceError::Mismatch));
        }

        let n = nonce::compute(&secret, dir, &ctx, t).unwrap();
        let other = NonceContext { binding: &other_binding, ..ctx };
        prop_assert_eq!(verify(&other, dir, &n), Err(NonceError::Mismatch));
        prop_assert_eq!(verify(&ctx, Direction::BrokerToClient, &n), Err(NonceError::Mismatch));
        let other = NonceContext { device: device.wrapping_add(1), ..ctx };
        prop_assert_eq!(verify(&other, dir, &n), Err(NonceError::Mismatch));
        let longer = format!("{entity}0");
        let other = NonceContext { entity: &longer, ..ctx };
        prop_assert_eq!(verify(&other, dir, &n), Err(NonceError::Mismatch));
        let wrong = Secret32::from_bytes([0x5a; 32]);
        prop_assume!(wrong != secret);
        prop_assert_eq!(
            nonce::verify(&wrong, dir, &ctx, &policy, now, &n),
            Err(NonceError::Mismatch)
        );
    }
}

#[test]
fn skew_zero_and_edges() {
    let secret = Secret32::from_bytes([1; 32]);
    let binding = [2u8; 32];
    let ctx = NonceContext {
        entity: "5550001234",
        device: 1,
        binding: &binding,
    };
    let strict = NoncePolicy {
        step_secs: 6,
        skew_steps: 0,
    };
    let n = nonce::compute(&secret, Direction::ClientToBroker, &ctx, 10).unwrap();
    assert_eq!(
        nonce::verify(&secret, Direction::ClientToBroker, &ctx, &strict, 60, &n),
        Ok(10)
    );
    assert_eq!(
        nonce::verify(&secret, Direction::ClientToBroker, &ctx, &strict, 66, &n),
        Err(NonceError::Mismatch)
    );
    // Near T = 0 the window is clipped, not wrapped.
    let n0 = nonce::compute(&secret, Direction::ClientToBroker, &ctx, 0).unwrap();
    let default = NoncePolicy::default();
    assert_eq!(
        nonce::verify(&secret, Direction::ClientToBroker, &ctx, &default, 0, &n0),
        Ok(0)
    );
    assert_eq!(
        nonce::verify(
            &secret,
            Direction::ClientToBroker,
            &ctx,
            &NoncePolicy {
                step_secs: 0,
                skew_steps: 1
            },
            0,
            &n0
        ),
        Err(NonceError::Time(micromsg_crypto::totp::TotpError::ZeroStep))
    );
    assert_eq!(
        nonce::verify(
            &secret,
            Direction::ClientToBroker,
            &ctx,
            &NoncePolicy {
                step_secs: 6,
                skew_steps: 17
            },
            0,
            &n0
        ),
        Err(NonceError::SkewTooLarge(17))
    );
    for bad in ["", "12a", "１２"] {
        let c = NonceContext { entity: bad, ..ctx };
        assert_eq!(
            nonce::compute(&secret, Direction::ClientToBroker, &c, 0),
            Err(NonceError::InvalidEntity)
        );
    }
}
