-- An enrollment record's life on a device. `udid` and `bound_at`: the device its certificates
-- first authenticated and when; `retired_*`: when and why its enrollment ended (the device
-- re-enrolled under `superseded_by`, or an admin retired it). Status, as EnrollmentStatus maps
-- it: pending (issued, not bound), migrated (another MDM's certificate, not bound), active
-- (bound), retired. A device's enrollment history is its records ordered by bound_at.
ALTER TABLE enrollments ADD COLUMN udid TEXT;
ALTER TABLE enrollments ADD COLUMN bound_at TIMESTAMPTZ;
ALTER TABLE enrollments ADD COLUMN retired_at TIMESTAMPTZ;
ALTER TABLE enrollments ADD COLUMN retired_reason TEXT;
ALTER TABLE enrollments ADD COLUMN retired_by TEXT;
ALTER TABLE enrollments ADD COLUMN superseded_by TEXT;
CREATE INDEX enrollments_udid ON enrollments (udid);

-- Records already bound to a device are active from their first Authenticate.
UPDATE enrollments SET
    udid = (SELECT d.udid FROM mdm_devices d WHERE d.enrollment_id = enrollments.id),
    bound_at = (SELECT COALESCE(d.owner_bound_at, d.authenticated_at) FROM mdm_devices d
                WHERE d.enrollment_id = enrollments.id),
    status = 'active'
WHERE id IN (SELECT enrollment_id FROM mdm_devices);
