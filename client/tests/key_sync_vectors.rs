//! The key sync vectors of protocol.md 15.2 (`MMK1`, `MML1`, `MMB1`; section 13.4), rebuilt with
//! the reference client's own code: its JSON serialisation of [`SharedSession`] and
//! [`KeyBundle`], its key derivations, and its open functions. `MMK1` and `MML1` draw their
//! nonce inside the client, so the items are sealed here with the fixed nonce (the same AEAD
//! call), and the client's own sealers are checked to produce that layout with their random
//! nonce. A change of the plaintext format (a member, its order, its encoding) or of the sealing
//! fails here, and so does a vector in protocol.md that differs from the constants below.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use micromsg_client::keys::{self, KeyBundle, KeysError, SharedSession};
use micromsg_client::p2p::StoredSession;
use micromsg_client::store::Contact;
use micromsg_crypto::handshake::Role;
use micromsg_crypto::message::{Kind, OfflineEnvelope};
use micromsg_crypto::{DirectionKeys, IdentityKey, IdentityPublicKey, Secret32, aead, hex, kdf};

/// `MMK1` plaintext: the session sync object, canonical form (642 bytes).
const MMK1_PLAINTEXT: &str = r#"{"peer":"5550009876","device":1,"session":{"version":1,"session_id":"bd73337bc2b6b2c446d8ecbf6ae65355","role":"initiator","peer_identity":"8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394","send":{"ts_key":"950475e217cda671ee7dd84dc41e73466edc42702473aff28fe749b013aca4d3","seed":"eb90ea19a275d9564e154e7c70ec83c85c647a7090cbf0097b4524fd586424c2"},"next_send_counter":1,"recv":{"ts_key":"fd759df375c1f9dc3c5417b898f322ef9e1a8df9faf4e90237cb0a5ac5f240d5","seed":"ab5f3628621488662a41e4c5d893daa77b3a5ae95a437c83a9d335d2749e09ca"},"recv_last_live":4,"recv_offline_seen":[6,7],"established_at":1700000000,"last_used":1700000100}}"#;
/// SHA-256 of [`MMK1_PLAINTEXT`].
const MMK1_PLAINTEXT_SHA256: &str =
    "4448a902e2fd0b2b347d29023c7be4d0c3fdc0664a0b387ef06d7702d75032ca";
/// HKDF of the identity seed `01` x 32.
const SYNC_KEY: &str = "20e6a83dc595a8fa735c065581801cc18301cb1bf2113eab4c1a617068e4c260";
/// The item sealed with nonce `30..47` (686 bytes).
const MMK1_ITEM: &str = concat!(
    "4d4d4b31303132333435363738393a3b3c3d3e3f404142434445464793e08d52171caa3e9770cf3cccb53267e6d671ce82f447b1c3f60648aa4cb9a62ac41dff",
    "b9ca60d91ff14fa561a7d001d46743ceccc607dec9d3df277fbbdb193aa31ce61754a2d57cd7765c6037ead2986b16332a5601e17e156c9167d3bd27d5dc61ab",
    "39488a9fae1706ae2a59cabeb5df66d0c6fd54ef924ff1aea20bbf0522d1b6d9e770016a8eb1a5c46fba3fcb9b81dc48ae48280f32930180941a5f236a03c9a5",
    "7bdc30d206680f81969bd4d5b6a9becb9b4d292c1b84694a23538b96581443ab01300e68ae16d54dcabd0e58886fd1113de6390b0545f5420847a8cea24e0ff7",
    "3ad6105458c8a8449a519aca622313ebcf3e1dca07090511a9271910b0fadc4b4aaf344fd7109796b246a0da00d7cd92918c5aaad631a6dd2267cf145fb68c8c",
    "219651edbce8c51a85e825a3988db027644ce1f7ceff1ed4b388ac6efd08fb585679a29c83a0d9fc4d0bd8f946e909c42baf927b238b7f395c3c1370b05ec421",
    "801b6e5abb4966c2f56074a1aaf7a8d8ebc0dcde5920bce72c9e745f4cf730b4401135261b9b90abd2112e312b066771fc3d72548f71bd11b543eb20eed5cc83",
    "50d5066123422eda977332c67a7a96b0e53f8a206146a7577c0f4d457c3cfbe39514518c83cfd7266477403d9a353e60ade756293fa503b6ddf1393af7fb1d03",
    "4c6c7e6927bffa64f4e29c19fb3543b0efc41f7848fd3c548124aaa579d7b144dcf648188ef3c30a002abc10e649a16d6e1c5f3310e84609577adeaf67e82b7f",
    "3f64401e473b23010477f405adaf4418c393d8d567ed43b4d2436b27537d02a9e15197b8153cfb746bb1e557aa4e3b4223b7b39f39b7660b917d7471da1de079",
    "83a544227198993876a8c65ab7c0ce21300067d33997c117eaeac02e1dade672172068fd0cf1ecf6b09249949e50",
);

/// `MML1` and `MMB1` plaintext: the key bundle, canonical form (1049 bytes).
const BUNDLE_PLAINTEXT: &str = r#"{"version":1,"number":"5550001234","identity_seed":"0101010101010101010101010101010101010101010101010101010101010101","contacts":{"5550004321":{"identity":null,"added_at":1700000050,"blocked":true},"5550009876":{"identity":"8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394","added_at":1700000000,"blocked":false,"address":"203.0.113.7:7001","name":"Bob"}},"sessions":[{"peer":"5550009876","device":1,"session":{"version":1,"session_id":"bd73337bc2b6b2c446d8ecbf6ae65355","role":"initiator","peer_identity":"8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394","send":{"ts_key":"950475e217cda671ee7dd84dc41e73466edc42702473aff28fe749b013aca4d3","seed":"eb90ea19a275d9564e154e7c70ec83c85c647a7090cbf0097b4524fd586424c2"},"next_send_counter":1,"recv":{"ts_key":"fd759df375c1f9dc3c5417b898f322ef9e1a8df9faf4e90237cb0a5ac5f240d5","seed":"ab5f3628621488662a41e4c5d893daa77b3a5ae95a437c83a9d335d2749e09ca"},"recv_last_live":4,"recv_offline_seen":[6,7],"established_at":1700000000,"last_used":1700000100}}],"created":1700000200}"#;
/// SHA-256 of [`BUNDLE_PLAINTEXT`].
const BUNDLE_PLAINTEXT_SHA256: &str =
    "d928f70f88380fa3c87965675593b7b36e7e8d4c118e3932cf1ce3864075ea0d";
/// HKDF of the transfer key `e0..ff`.
const LINK_KEY: &str = "6c39c30d5e57a2b7d39c84d21ea2090da83211f3d91f9bb9f763de1bb1da59fb";
/// The transfer to device 2 sealed with nonce `48..5f` (1093 bytes).
const MML1_ITEM: &str = concat!(
    "4d4d4c3148494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f2d59df7ac2ba9328d7d49b4673bca9f092f07f85b55ed4e0a4442e47eb70c796a105966c",
    "9ea1bfccd00824b8c720eb9b15fcb129183614c4105b220d86ac2e6bd7dc8b0413b21b6f0f8998736bc86dd67edc68919f4e5cfc86be09633b46795e3de050d7",
    "ae2f1110c594554fe16125fa7421581e71e1fbd8ff8043ecf93490a858419fa6efc306cdc534b231d32567fdd9e253dbc61984fff8da5a8ee1f8aac370f04874",
    "d5ad7c1ffd56c0ce7cf05b40638ce4fd0fc8592d7cfee31006505420ec53cfff12890bb0b2c51626e70043af1cac7e4a27bb807c1df29427a30e343359d8e801",
    "45224338d0c95562fbfe570304ac36973272dd7094aa91d08358bc3ad61c1d08d41dd3dbcf5d698bf0ab1a293853e12f341b35ca9bd256bb82fbd0be8fb6da3e",
    "7bb70cae5be8db010c56ab1e7a074dac51714859fdc891bed2d350145d02fba0070ea48201a30799bf01726e4d220ea6e9f5a29ecbb71c25dbc9ba09538d2f99",
    "20466380bccc3dfed2ed0119da9399dc70fea924cca3301cb2a1c60112c90a17445f2b0a75c43c339c0eee51c967aa85a60b5b7b43decfa0e1425823d11c39c0",
    "fe55460c46fd88ae843f3a2168cbaf751a6bab21a36b3517911c5d2adf373bf3adabf4d15bf25194a630ca7bef335f37fd6078669d5e1001c4b9ccc9b17d23d8",
    "98aee30cd7e888cd4e1e30a208d340417db81baaf1ab7b2b24098d35338a32a9ef50de9e4d03f032c1232d28db1e862064134a59222121ca948a5937bb54cd0e",
    "038e23404848ced0b3fe621305af2bfcf0f88f9f68b5866a88bfd79290abe5f5f5b26749bb282bafdb4a6d5b1b5d62675ff7d97d2ae5ab278deb66e64d968cda",
    "6bccffd0ee83783015be1337b7759c22bcc33c6f90514e0ee5b425e6a2e2dbd729180b2d2b4413962a413aca7a4210866ecdd86d20657027eace99bc604c1cc1",
    "8378f74c1120b31cde197c521f3e19eadbf6a5d2ebfd614fcab6a8d523a7b2888f042ce3739a76e312850d7ba2f1a74a20234edeea68501cf8f4096b3f9b55ea",
    "8576b7e8226c5238bad49d7f3694ead0dc1541db446713abac2e3085b064169d7e398409c1428bec0fdbd29a726be56b0f60d9e130a3a85a7a495b10618ee393",
    "d68083fba827c5e1b6de7d372b1b7c110bbdb7e761a88516ffd068d0e53d26b1b608651712005d09a4e22dae198a59827af3b5b08a291a7db2a6e3f1292537fe",
    "cbb23a632698b8f661ed32f4e2a75320a56b726c92c049ba71b7b39668961312e8577869d9df092f7637d3a5d3333ae91d8b94db45720c7862389f1f8282418c",
    "5ff18e6c16b42a428db95479ff8d42b68a97f4214536c13de766b24d0f545542e535d44778a6a001d09d0b9dd178483b8ac13f2eaf74b6516f7f76a1aa215727",
    "15cdfa7acbbd11ede9fb93af21baca37a5786b573122efc32843d66a856e789ecb8c780d2cf7dd2fc257248ea33bba2066c44941da30868cb4b4d1b291f06bb4",
    "da8a37c220",
);

/// The recovery secret as the reference client shows it.
const RECOVERY_SHOWN: &str = "7KQ2M-0A1BC-DEFGH-JKMNP-QRSTV-WXYZ3-45678-9ABCD";
/// The same secret as a user may type it (case, spaces, `o` for `0`, `i` for `1`).
const RECOVERY_TYPED: &str = "7kq2m oaibc defgh jkmnp qrstv wxyz3 45678 9abcd";
/// Its canonical form, the Argon2id password.
const RECOVERY_PASSWORD: &str = "7KQ2M0A1BCDEFGHJKMNPQRSTVWXYZ3456789ABCD";
/// Argon2id(password, salt `60..6f`).
const BACKUP_KEY: &str = "4bdb3737a15368a4d58676f6ee94dc68d1542ebcbfe72b0bd7483c7edba08a21";
/// The backup blob, salt `60..6f`, nonce `70..87` (1109 bytes).
const MMB1_BLOB: &str = concat!(
    "4d4d4231606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f8081828384858687a5c479d7773a11ca6af26dc67ece0ca1effdc0a6",
    "234d859b83efa1090dc44beabfb9cc359308b8fb2aae9aba79bd75741d6399faac7f6244ca0e42e6f27b284313ca92a35cfcce0782c887281dae4d4d11dd62db",
    "ea3b56239c3d97311171fd9e1c31f4099484d76dfcedc3d392333863e99c39c60826eeecee9ede89308a25af2db3d7abacda2ea87bef021bb5af6fbf809485be",
    "6ab56a456d27e2b095018ae9c37e9a1147ec441e87fd11d166371b19a0b3c7ea94f1b6d483c67a571c7f78cffe0b6d608d671ef16b63c1f2284fc85f62fbe421",
    "82d45afad25a9c087053799a57ce07f1e0a22803f2c1af493b8f592ecab05ffed1363326ae55931f1817a61fbf9bcd56dd3d794594a7c0664dc777407cc08239",
    "7d0a5d74343f6f2cd078853c04e83c1a590a3c66a309f30b33e522f2b3b8bd8fbe5ebf68b9f89f9ababa75c2fd03dbe557c18600204501886a5a3409a91b5851",
    "77dbbc47db604554900af04ce32851f5d7352ec8861156b7723a2a25d22e0634ba781c4d334a2a1712aa4d2040aa53752ef983c8b65d10bab35fa041bea85187",
    "0b982b71539e2a604837f6c146d4af5dc510d37f562a3c70b26612789424eb36f0a5b6059d96b66b7b95a95aab9f3ceda25a6f6816d9aefd7c68a1a416b7dc59",
    "d4493acea5a64709e7f3373d01cc87d1d7d173079eedee20fe7a1f34c106e0bf51e8c31a27b6bf715dcdfef152a864e2c0de089aee67c5eabfa421d3a35a13b5",
    "d56d77499be024765e19ce9dd168ba2a278435c8d00b75af41023274742fea5089a2b57671cbebfb5ef0c3237082ad32ae28983fbd001d3de270e0fc4bf4d41c",
    "93f9c25d59561ab2902f690eea5fe5c966552d07cf11384700dc721620c922e694e2ed9f4f04a6453595e85956eff16291b992b4489817cb6032f54a8eb0f4d9",
    "8dbf5650c4a5a8ca0627d62f167221cba3ce4d2ec5a240e084e2c94d2b10fbe23c46cf4711d13c5979ab383470685c7758d96d7cc71a75ad181c3e86393cec87",
    "4ef4bc73d65b4601720391d7d8554f8cc97cc11e987dd308c61cfc2bfc2586fcbac9914f05a59993f443a208f89a05986f59929be6cdc6517fda57e1204023fe",
    "5b92aee58bec4b441f420a5296752c3886e2913d350fd6481fd4fa1d3cb06ec6cd7989762a9201631c63539b014ea2e390eea8c06e1267ca791754ea684dff8c",
    "dd2f836187d54a3a28d99a433d2ccb73e8b6f9aaa94883fd914c41989a543575fce55460d16178b9083a4d51efe05540174c62d27003527c575263628d563dfb",
    "f5b00d4f6603b71a374848693d1d00bf89e1bfd125a1e0052904ff04f27f5bb96599418c77446008e06d8fd70b70d47d4c6804aae522d25359be183ffd4935f9",
    "c8f8e730e34dcd329173be9beffedd29c3943fc2872ecd9cf1c4f56d9a83af14ec976d6435926f4a48c6ad9c9ef912549d2181e073355d76c83fd4df16b962fa",
    "842ead5a4ab297269d5d5b7418937543a92be2b7b7",
);

/// The offline envelope of protocol.md 15.1 (device 1's "hello" to the contact).
const ENVELOPE_15_1: &str = concat!(
    "4d4d4f31bd73337bc2b6b2c446d8ecbf6ae653551000000000000000001cfa93a0d5ceaf07123e02ded756285a",
    "f356ee7179d3d4beca9fd4f761c004d398d909c77d9a8d2620eb3532111364e27305a2",
);

fn counting<const N: usize>(from: u8) -> [u8; N] {
    core::array::from_fn(|i| from.wrapping_add(i as u8))
}

fn secret(h: &str) -> Secret32 {
    Secret32::from_hex(h).unwrap()
}

fn unhex(h: &str) -> Vec<u8> {
    hex::decode(h).unwrap()
}

/// The entity's identity seed: `identity_seed_i` of 15.1 (`01` x 32).
fn identity_seed() -> Secret32 {
    Secret32::from_bytes([1; 32])
}

/// The contact's identity key: `id_r` of 15.1 (seed `02` x 32).
fn contact_key() -> IdentityPublicKey {
    IdentityKey::from_seed(&Secret32::from_bytes([2; 32])).public_key()
}

/// The session of 15.1 as its initiator (this entity's device 1) keeps it after sending one
/// message and receiving counters 0 to 4 live and 6 and 7 offline.
fn session() -> StoredSession {
    StoredSession {
        session_id: hex::decode_array("bd73337bc2b6b2c446d8ecbf6ae65355").unwrap(),
        role: Role::Initiator,
        peer_identity: contact_key(),
        send: DirectionKeys {
            ts_key: secret("950475e217cda671ee7dd84dc41e73466edc42702473aff28fe749b013aca4d3"),
            seed: secret("eb90ea19a275d9564e154e7c70ec83c85c647a7090cbf0097b4524fd586424c2"),
        },
        next_send_counter: 1,
        recv: DirectionKeys {
            ts_key: secret("fd759df375c1f9dc3c5417b898f322ef9e1a8df9faf4e90237cb0a5ac5f240d5"),
            seed: secret("ab5f3628621488662a41e4c5d893daa77b3a5ae95a437c83a9d335d2749e09ca"),
        },
        recv_last_live: Some(4),
        recv_offline_seen: BTreeSet::from([6, 7]),
        established_at: 1_700_000_000,
        last_used: 1_700_000_100,
    }
}

fn shared() -> SharedSession {
    SharedSession {
        peer: "5550009876".into(),
        device: 1,
        session: session(),
    }
}

fn bundle() -> KeyBundle {
    let mut contacts = BTreeMap::new();
    contacts.insert(
        "5550009876".to_owned(),
        Contact {
            identity: Some(contact_key()),
            added_at: 1_700_000_000,
            blocked: false,
            address: Some("203.0.113.7:7001".into()),
            name: Some("Bob".into()),
            presented: None,
            verified: None,
            moved_at: None,
            safety_as: None,
            repair: false,
            former: Vec::new(),
        },
    );
    contacts.insert(
        "5550004321".to_owned(),
        Contact {
            identity: None,
            added_at: 1_700_000_050,
            blocked: true,
            address: None,
            name: None,
            presented: None,
            verified: None,
            moved_at: None,
            safety_as: None,
            repair: false,
            former: Vec::new(),
        },
    );
    KeyBundle::new(
        "5550001234",
        &identity_seed(),
        contacts,
        vec![shared()],
        1_700_000_200,
    )
}

/// `magic || nonce || XChaCha20-Poly1305(key, nonce, aad, plaintext)`: the layout of 13.4.
fn seal(magic: &[u8], key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(nonce);
    aead::xseal_into(key, nonce, aad, plain, &mut out).unwrap();
    out
}

/// Checks that `blob`, made by the client with a random nonce, is `seal(...)` with that nonce.
fn assert_layout(blob: &[u8], magic: &[u8], key: &[u8; 32], aad: &[u8], plain: &[u8]) {
    assert_eq!(blob.len(), 4 + 24 + plain.len() + 16);
    let nonce: [u8; 24] = blob[4..28].try_into().unwrap();
    assert_eq!(blob, seal(magic, key, &nonce, aad, plain));
}

fn mml1_aad(device: u32) -> Vec<u8> {
    let mut aad = b"MML1".to_vec();
    aad.extend_from_slice(&device.to_be_bytes());
    aad
}

#[test]
fn mmk1_session_sync_vector() {
    let plain = serde_json::to_vec(&shared()).unwrap();
    assert_eq!(String::from_utf8(plain.clone()).unwrap(), MMK1_PLAINTEXT);
    assert_eq!(plain.len(), 642);
    assert_eq!(hex::encode(&kdf::sha256(&[&plain])), MMK1_PLAINTEXT_SHA256);

    let key = keys::entity_sync_key(&identity_seed());
    assert_eq!(hex::encode(key.expose()), SYNC_KEY);
    let item = seal(b"MMK1", key.expose(), &counting(0x30), b"MMK1", &plain);
    assert_eq!(hex::encode(&item), MMK1_ITEM);

    // The reference client opens the vector into the same session.
    let opened = keys::open_session_sync(&identity_seed(), &unhex(MMK1_ITEM)).unwrap();
    assert_eq!(opened, shared());
    // Its own sealer (random nonce) has the same layout.
    let blob = keys::seal_session_sync(&identity_seed(), &shared()).unwrap();
    assert_layout(&blob, b"MMK1", key.expose(), b"MMK1", &plain);

    // Damaged, cut short, or under another identity: not opened.
    let mut damaged = unhex(MMK1_ITEM);
    damaged[30] ^= 1;
    assert!(matches!(
        keys::open_session_sync(&identity_seed(), &damaged),
        Err(KeysError::WrongKey(_))
    ));
    assert!(matches!(
        keys::open_session_sync(&identity_seed(), &unhex(MMK1_ITEM)[..43]),
        Err(KeysError::Malformed(_))
    ));
    assert!(keys::open_session_sync(&Secret32::from_bytes([2; 32]), &unhex(MMK1_ITEM)).is_err());

    // The synced `send` keys open the 15.1 envelope that device 1 sent (a copy, 13.3).
    let envelope = unhex(ENVELOPE_15_1);
    let envelope = OfflineEnvelope::decode(&envelope).unwrap();
    assert_eq!(envelope.session_id, opened.session.session_id);
    let msg = opened.session.send.open(envelope.frame).unwrap();
    assert_eq!((msg.counter, msg.kind), (0, Kind::Text));
    assert_eq!(msg.payload, b"hello");
}

#[test]
fn mml1_link_transfer_vector() {
    let plain = bundle().to_json().unwrap();
    assert_eq!(std::str::from_utf8(&plain).unwrap(), BUNDLE_PLAINTEXT);
    assert_eq!(plain.len(), 1049);
    assert_eq!(
        hex::encode(&kdf::sha256(&[&plain])),
        BUNDLE_PLAINTEXT_SHA256
    );

    let transfer = Secret32::from_bytes(counting(0xe0));
    let key = keys::link_key(&transfer);
    assert_eq!(hex::encode(key.expose()), LINK_KEY);
    assert_eq!(hex::encode(&mml1_aad(2)), "4d4d4c3100000002");
    let item = seal(b"MML1", key.expose(), &counting(0x48), &mml1_aad(2), &plain);
    assert_eq!(hex::encode(&item), MML1_ITEM);

    let opened = keys::open_link(&transfer, 2, &unhex(MML1_ITEM)).unwrap();
    assert_eq!(&opened.to_json().unwrap()[..], BUNDLE_PLAINTEXT.as_bytes());
    assert_eq!(opened.identity_seed().unwrap(), identity_seed());
    // Bound to the device id in the AAD, and to the transfer key.
    assert!(keys::open_link(&transfer, 3, &unhex(MML1_ITEM)).is_err());
    assert!(keys::open_link(&Secret32::from_bytes([0xe0; 32]), 2, &unhex(MML1_ITEM)).is_err());

    let blob = keys::seal_link(&transfer, 2, &bundle()).unwrap();
    assert_layout(&blob, b"MML1", key.expose(), &mml1_aad(2), &plain);
}

#[test]
fn mmb1_backup_vector() {
    assert_eq!(*keys::recovery_password(RECOVERY_SHOWN), RECOVERY_PASSWORD);
    assert_eq!(*keys::recovery_password(RECOVERY_TYPED), RECOVERY_PASSWORD);
    let salt: [u8; 16] = counting(0x60);
    let key = keys::backup_key(RECOVERY_PASSWORD, &salt).unwrap();
    assert_eq!(hex::encode(key.expose()), BACKUP_KEY);

    let plain = bundle().to_json().unwrap();
    let blob = keys::seal_backup_with(RECOVERY_SHOWN, &salt, &counting(0x70), &plain).unwrap();
    assert_eq!(hex::encode(&blob), MMB1_BLOB);
    let mut aad = b"MMB1".to_vec();
    aad.extend_from_slice(&salt);
    let mut again = aad.clone();
    again.extend_from_slice(&counting::<24>(0x70));
    aead::xseal_into(key.expose(), &counting(0x70), &aad, &plain, &mut again).unwrap();
    assert_eq!(
        again, blob,
        "MMB1 = magic || salt || nonce || ct, aad = magic || salt"
    );

    let opened = keys::open_backup(RECOVERY_TYPED, &unhex(MMB1_BLOB)).unwrap();
    assert_eq!(&opened[..], BUNDLE_PLAINTEXT.as_bytes());
    let bundle = KeyBundle::from_json(&opened).unwrap();
    assert_eq!(&bundle.to_json().unwrap()[..], BUNDLE_PLAINTEXT.as_bytes());
}

fn read_sync(json: &str) -> Result<SharedSession, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn read_bundle(json: &str) -> Result<KeyBundle, String> {
    KeyBundle::from_json(json.as_bytes()).map_err(|e| e.to_string())
}

/// The reading rules of 13.4, as the reference client applies them.
#[test]
fn plaintext_readers_follow_the_spec() {
    let base = MMK1_PLAINTEXT;
    let with = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        base.replacen(from, to, 1)
    };
    // Any member order, white space, escapes; upper-case hex.
    let reordered = r#" { "session" : {"last_used":1700000100,"established_at":1700000000,
        "recv_offline_seen":[7,6,7],"recv_last_live":4,
        "recv":{"seed":"ab5f3628621488662a41e4c5d893daa77b3a5ae95a437c83a9d335d2749e09ca",
                "ts_key":"FD759DF375C1F9DC3C5417B898F322EF9E1A8DF9FAF4E90237CB0A5AC5F240D5"},
        "next_send_counter":1,
        "send":{"seed":"eb90ea19a275d9564e154e7c70ec83c85c647a7090cbf0097b4524fd586424c2",
                "ts_key":"950475e217cda671ee7dd84dc41e73466edc42702473aff28fe749b013aca4d3"},
        "peer_identity":"8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
        "role":"initiator","session_id":"bd73337bc2b6b2c446d8ecbf6ae65355","version":1},
        "device":1, "p\u0065er":"5550009876" }
    "#;
    assert_eq!(read_sync(reordered).unwrap(), shared());
    // Optional members absent.
    let bare = read_sync(&with(
        r#""recv_last_live":4,"recv_offline_seen":[6,7],"#,
        "",
    ))
    .unwrap();
    assert_eq!(bare.session.recv_last_live, None);
    assert!(bare.session.recv_offline_seen.is_empty());
    assert!(read_sync(&with(r#""recv_last_live":4"#, r#""recv_last_live":null"#)).is_ok());
    assert!(read_sync(&with(r#""device":1"#, r#""device":4294967295"#)).is_ok());
    assert!(
        read_sync(&with(
            r#""next_send_counter":1"#,
            r#""next_send_counter":18446744073709551615"#
        ))
        .is_ok()
    );

    for (from, to) in [
        (r#"{"peer""#, r#"{"x":0,"peer""#),            // unknown member
        (r#""send":{"#, r#""send":{"x":0,"#),          // unknown, nested
        (r#""device":1"#, r#""device":1,"device":1"#), // repeated member
        (r#","last_used":1700000100"#, ""),            // required member missing
        (r#""version":1,"#, ""),                       // version missing
        (r#""version":1"#, r#""version":2"#),          // another version
        (r#""device":1"#, r#""device":4294967296"#),   // beyond u32
        (r#""device":1"#, r#""device":1.0"#),          // fraction
        (r#""device":1"#, r#""device":1e0"#),          // exponent
        (r#""device":1"#, r#""device":-1"#),           // sign
        (r#""device":1"#, r#""device":"1""#),          // string
        (
            r#""next_send_counter":1"#,
            r#""next_send_counter":18446744073709551616"#,
        ),
        (r#""role":"initiator""#, r#""role":"Initiator""#), // enum spelling
        (
            r#""recv_offline_seen":[6,7]"#,
            r#""recv_offline_seen":null"#,
        ),
        (
            "bd73337bc2b6b2c446d8ecbf6ae65355",
            "bd73337bc2b6b2c446d8ecbf6ae653",
        ), // length
        (
            "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
            "0000000000000000000000000000000000000000000000000000000000000000", // small order
        ),
    ] {
        assert!(read_sync(&with(from, to)).is_err(), "{from} -> {to}");
    }
    assert!(read_sync(&format!("{base}x")).is_err(), "trailing bytes");
    assert!(
        read_sync(&format!("\u{feff}{base}")).is_err(),
        "byte order mark"
    );
    assert!(
        read_sync(&format!("{base} \n")).is_ok(),
        "trailing white space"
    );

    // The bundle and its contacts.
    let b = BUNDLE_PLAINTEXT;
    let bwith = |from: &str, to: &str| {
        assert!(b.contains(from), "{from}");
        b.replacen(from, to, 1)
    };
    let min = bwith(
        r#"{"identity":null,"added_at":1700000050,"blocked":true}"#,
        r#"{"added_at":1700000050,"address":null,"name":null,"presented":null}"#,
    );
    let read = read_bundle(&min).unwrap();
    let c = &read.contacts["5550004321"];
    assert_eq!((c.identity, c.blocked, &c.address), (None, false, &None));
    for (from, to) in [
        (r#"{"version":1"#, r#"{"version":2"#),
        (r#"{"version":1,"#, "{"),
        (r#"{"identity":null,"#, r#"{"identity":null,"x":0,"#),
        (r#""blocked":true"#, r#""blocked":1"#),
        (r#","created":1700000200"#, ""),
        (r#""sessions":["#, r#""x":[],"sessions":["#),
    ] {
        assert!(read_bundle(&bwith(from, to)).is_err(), "{from} -> {to}");
    }
    // The reference reads a bad seed and refuses it when installing.
    let bad_seed = read_bundle(&bwith("0101010101", "zz01010101")).unwrap();
    assert!(bad_seed.identity_seed().is_err());
}

/// protocol.md holds exactly these vectors (white space, including the wrapping of the long
/// hex values, left out).
#[test]
fn protocol_md_holds_these_vectors() {
    let doc: String = include_str!("../../docs/protocol.md")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    for (name, value) in [
        ("MMK1 plaintext", MMK1_PLAINTEXT),
        ("MMK1 plaintext SHA-256", MMK1_PLAINTEXT_SHA256),
        ("sync_key", SYNC_KEY),
        ("MMK1 item", MMK1_ITEM),
        ("bundle plaintext", BUNDLE_PLAINTEXT),
        ("bundle plaintext SHA-256", BUNDLE_PLAINTEXT_SHA256),
        ("link_key", LINK_KEY),
        ("MML1 item", MML1_ITEM),
        ("recovery password", RECOVERY_PASSWORD),
        ("backup key", BACKUP_KEY),
        ("MMB1 blob", MMB1_BLOB),
    ] {
        assert!(
            doc.contains(value),
            "protocol.md 15.2 lacks the {name} {value}"
        );
    }
    assert!(include_str!("../../docs/protocol.md").contains(RECOVERY_SHOWN));
    assert!(include_str!("../../docs/protocol.md").contains(RECOVERY_TYPED));
}
