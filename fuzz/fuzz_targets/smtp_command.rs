//! SMTP command lines as the relay parses them: never a panic, whatever the bytes. A MAIL or
//! RCPT whose DSN parameters the relay keeps is passed on as parameters that read back as
//! the same request, and an address the relay takes is passed on in a form that reads back
//! as the same address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_dsn::{DsnRequest, RcptDsn};
use mxrelay_message_data::address::{parse_command, smtp_path, unwritable};
use smtp_proto::Request;

fn parse(line: &str) -> Option<Request<String>> {
    let mut scratch = Vec::new();
    parse_command(line.as_bytes(), &mut scratch).ok().map(Request::into_owned)
}

/// An address the relay takes (`unwritable` says nothing against it) goes on as it came.
fn written_back_reads_the_same(address: &str) {
    if unwritable(address).is_some() {
        return;
    }
    let again = format!("RCPT TO:<{}>\r\n", smtp_path(address));
    let Some(Request::Rcpt { to }) = parse(&again) else {
        panic!("{again:?} does not parse");
    };
    assert_eq!(to.address, address, "{again:?}");
}

fuzz_target!(|line: &[u8]| {
    let mut line = line.to_vec();
    line.extend_from_slice(b"\r\n");
    let mut scratch = Vec::new();
    match parse_command(&line, &mut scratch) {
        Ok(Request::Mail { from }) => {
            written_back_reads_the_same(&from.address);
            let Ok(Some(request)) = DsnRequest::from_mail(from.flags, from.env_id.as_deref()) else {
                return;
            };
            let again = format!("MAIL FROM:<a@b.test>{}\r\n", request.mail_params());
            let Some(Request::Mail { from }) = parse(&again) else {
                panic!("{again:?} does not parse");
            };
            assert_eq!(DsnRequest::from_mail(from.flags, from.env_id.as_deref()), Ok(Some(request)), "{again:?}");
        }
        Ok(Request::Rcpt { to }) => {
            written_back_reads_the_same(&to.address);
            let Ok(Some(rcpt)) = RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref()) else {
                return;
            };
            let mut request = DsnRequest::default();
            request.recipients.insert("a@b.test".into(), rcpt.clone());
            let again = format!("RCPT TO:<a@b.test>{}\r\n", request.rcpt_params("a@b.test"));
            let Some(Request::Rcpt { to }) = parse(&again) else {
                panic!("{again:?} does not parse");
            };
            assert_eq!(RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref()), Ok(Some(rcpt)), "{again:?}");
        }
        _ => {}
    }
});
