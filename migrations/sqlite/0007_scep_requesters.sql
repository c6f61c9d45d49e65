-- Who asked for each certificate, and which certificates a renewal replaced.
--
-- signer_key_sha256: SHA-256 (hex) of the SubjectPublicKeyInfo that signed the SCEP request.
-- A client may sign its PKCSReq with a throwaway certificate whose key is not the one it asks
-- to certify; replays, GetCertInitial and GetCert are answered only to that same signer key.
-- NULL for certificates recorded before this migration, when the signer key always was the
-- certified key, so the certificate's own key stands in for it.
ALTER TABLE certificates ADD COLUMN signer_key_sha256 TEXT;

-- superseded_by: the serial of the certificate a RenewalReq issued in its place. A certificate
-- is renewed at most once (a stolen key cannot mint a chain of certificates), and its
-- not_after is cut to the end of a short overlap when the renewal is recorded.
ALTER TABLE certificates ADD COLUMN superseded_by TEXT;

-- Renewals recorded before this migration: mark what they replaced so it is not renewed again.
UPDATE certificates SET superseded_by = (
    SELECT MIN(renewal.serial) FROM certificates renewal
    WHERE renewal.renewed_from = certificates.serial
) WHERE superseded_by IS NULL;
