// Preloaded with `node --require ./timeshift.js` to move a local server's clock forward:
// Date.now() and `new Date()` add the milliseconds written in $TIMESHIFT_FILE (0 if the file
// is missing). Tests use it to age Kinesis shard iterators past their 5-minute expiry without
// waiting: the server's own expiry check then fails the next GetRecords, as AWS would.
const fs = require('fs');
const file = process.env.TIMESHIFT_FILE;
const RealDate = Date;
function offset() {
  if (!file) return 0;
  try { return Number(fs.readFileSync(file, 'utf8').trim()) || 0; } catch (e) { return 0; }
}
class ShiftedDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(RealDate.now() + offset()); else super(...args);
  }
  static now() { return RealDate.now() + offset(); }
}
global.Date = ShiftedDate;
